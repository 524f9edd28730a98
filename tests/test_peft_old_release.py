"""Adapters saved with format="peft" load in an old peft release with deltatune's outputs (atol 1e-5).

peft 0.6 to 0.13 build a config with `Config(**adapter_config)` and raise TypeError on a key they do not
know, so a file that lists every key of peft 0.21 (all of them null or false for a plain LoRA) does not load
there. The old release lives in a folder of its own, installed without dependencies (`make test` puts peft
0.9.0 into `.venv-transformers457/peft-old`; `DELTATUNE_OLD_PEFT` names another folder): one subprocess
with only that folder on PYTHONPATH loads the tiny Llama from a saved folder and each adapter with
`PeftModel.from_pretrained`, and writes its logits beside the adapter. A case whose folder needs a newer
release than the one installed (`peft_releases.minimum_peft_version`: DoRA needs 0.9) is skipped; one dated
exactly there (`DATED_EXACTLY`) is refused by the older release or loaded as another model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.peft_releases import FIRST_KEYS, FIRST_READERS, LATER_KEYS, minimum_peft_version, release_of
from tiny_models import LENGTH, build, run, token_inputs

OLD_PEFT = Path(os.environ.get("DELTATUNE_OLD_PEFT", Path(sys.prefix) / "peft-old"))
OLD_RELEASE = next((entry.name[5:-10] for entry in OLD_PEFT.glob("peft-*.dist-info")), None)
pytestmark = [
    pytest.mark.skipif(
        not (OLD_PEFT / "peft").is_dir() or OLD_RELEASE is None,
        reason=f"no old peft release at {OLD_PEFT} (make test installs one into the transformers 4.57 environment)",
    ),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

ATOL = 1e-5
DROPPED_BY_0_15 = {"OFT": {"rank_pattern", "alpha_pattern"}}
"""Keys of an old config class that peft 0.15 removed (0.14's OFT still listed LoRA's patterns, unused)."""
FIELDS = "old-peft-config-fields.json"
"""Where the subprocess lists the fields of the old release's config classes (peft type → field names)."""
CASES = {
    "lora": lambda: deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "dora": lambda: deltatune.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, use_dora=True
    ),
    "prompt_tuning": lambda: deltatune.PromptTuningConfig(num_virtual_tokens=3),
    "lokr_scale_1": lambda: deltatune.LoKrConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"]),
    "lokr_scaled": lambda: deltatune.LoKrConfig(r=2, alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora_embedding": lambda: deltatune.LoraConfig(
        r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False, use_dora=True
    ),
}
DATED_EXACTLY = ["lokr_scaled", "dora_embedding"]
"""Cases whose release the table gives exactly (the one before it loads them otherwise or refuses them)."""

LOADER = """
import dataclasses, json, sys, traceback
import torch, peft
from transformers import AutoModelForCausalLM

old_peft, base, inputs, fields, *adapters = sys.argv[1:]
if not peft.__file__.startswith(old_peft):
    sys.exit(f"imported peft from {peft.__file__}, not from {old_peft}")
classes = {name: cls for name, cls in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING.items()}
open(fields, "w").write(json.dumps({name: [f.name for f in dataclasses.fields(cls)] for name, cls in classes.items()}))
input_ids = torch.load(inputs)
for folder in adapters:
    try:
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
        with torch.no_grad():
            torch.save(model(input_ids=input_ids).logits[:, -input_ids.shape[1]:], folder + "/old-peft-logits.pt")
    except Exception:
        open(folder + "/old-peft-error.txt", "w").write(traceback.format_exc())
"""


def lively(delta_model: deltatune.DeltaModel) -> None:
    """Move every adapter weight off its initial value, so that a loader that drops a part shows."""
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.add_(0.3 * torch.randn_like(parameter))


@pytest.fixture(scope="module")
def loaded_by_old_peft(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.Tensor, Path]]:
    """Case → (deltatune's logits, the adapter folder the old release loaded, holding its logits or error);
    the folder above them holds the old release's config fields (`FIELDS`)."""
    root = tmp_path_factory.mktemp("old-peft")
    build("llama").save_pretrained(root / "base")
    torch.save(token_inputs(1)["input_ids"], root / "inputs.pt")
    expected = {}
    for name, config in CASES.items():
        delta_model = deltatune.attach(build("llama"), config())
        torch.manual_seed(3)
        lively(delta_model)
        with torch.no_grad():
            expected[name] = (run(delta_model.eval(), "llama"), root / name)
        delta_model.save(str(root / name), format="peft")
    environment = {**os.environ, "PYTHONPATH": str(OLD_PEFT)}
    command = [sys.executable, "-c", LOADER, str(OLD_PEFT), str(root / "base"), str(root / "inputs.pt")]
    command.append(str(root / FIELDS))
    done = subprocess.run(
        [*command, *(str(folder) for _, folder in expected.values())],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return expected


@pytest.mark.parametrize("case", list(CASES))
def test_an_old_peft_release_loads_the_saved_folder_with_the_same_outputs(
    loaded_by_old_peft: dict[str, tuple[torch.Tensor, Path]], case: str
) -> None:
    expected, folder = loaded_by_old_peft[case]
    needed = minimum_peft_version(folder)
    if release_of(needed) > release_of(OLD_RELEASE):
        pytest.skip(f"the {case} folder needs peft {needed}; the old release at {OLD_PEFT} is {OLD_RELEASE}")
    error = folder / "old-peft-error.txt"
    assert not error.exists(), error.read_text()[-1500:]
    assert expected.shape[1] == LENGTH
    assert (expected - run(build("llama"), "llama")).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(torch.load(folder / "old-peft-logits.pt"), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", DATED_EXACTLY)
def test_an_old_release_older_than_a_folders_minimum_refuses_it_or_computes_another_model(
    loaded_by_old_peft: dict[str, tuple[torch.Tensor, Path]], case: str
) -> None:
    expected, folder = loaded_by_old_peft[case]
    needed = minimum_peft_version(folder)
    if release_of(needed) <= release_of(OLD_RELEASE):
        pytest.skip(f"the {case} folder needs peft {needed}; the old release at {OLD_PEFT} is {OLD_RELEASE}")
    if not (folder / "old-peft-error.txt").exists():
        assert (torch.load(folder / "old-peft-logits.pt") - expected).abs().max() > 1e-3


@pytest.mark.parametrize("peft_type", list(FIRST_READERS))
def test_the_release_table_dates_the_keys_of_the_old_release_as_its_config_classes_have_them(
    loaded_by_old_peft: dict[str, tuple[torch.Tensor, Path]], peft_type: str
) -> None:
    fields = json.loads((next(iter(loaded_by_old_peft.values()))[1].parent / FIELDS).read_text())
    if release_of(FIRST_READERS[peft_type]) > release_of(OLD_RELEASE):
        pytest.skip(f"the table has {peft_type} from peft {FIRST_READERS[peft_type]} on; this release is {OLD_RELEASE}")
    dated = {
        key for key, entry in LATER_KEYS[peft_type].items() if release_of(entry.release) <= release_of(OLD_RELEASE)
    }
    dropped = DROPPED_BY_0_15.get(peft_type, set()) if release_of(OLD_RELEASE) < (0, 15) else set()
    assert set(fields[peft_type]) == {*FIRST_KEYS[peft_type], *dated, *dropped}
