"""The table of which peft release introduced which config key (`deltatune.peft_releases`), and the lean
`adapter_config.json` that `format="peft"` writes from it.

The table is checked against peft 0.21.2's own config classes here (every key dated, none invented) and
against an old release in tests/test_peft_old_release.py; that peft loads the lean files with our outputs
is what the peft cross-checks (tests/test_peft_crosscheck.py, test_oft.py, ...) check on every save.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

import deltatune
from deltatune.errors import AdapterFileError
from deltatune.peft_format import PEFT_VERSION
from deltatune.peft_releases import (
    ALWAYS_WRITTEN,
    FIRST_KEYS,
    FIRST_READERS,
    LATER_KEYS,
    minimum_peft_version,
    release_of,
)
from tiny_models import build

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG_CLASSES = {peft_type: peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] for peft_type in FIRST_READERS}

SAVED = {
    "lora": (lambda: deltatune.LoraConfig(r=4, target_modules="all-linear"), "0.4.0"),
    "rslora": (lambda: deltatune.LoraConfig(r=4, target_modules=["q_proj"], use_rslora=True), "0.8.0"),
    "dora": (lambda: deltatune.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "0.9.0"),
    "rank_pattern": (
        lambda: deltatune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}),
        "0.15.0",
    ),
    "ia3": (lambda: deltatune.IA3Config(), "0.4.0"),
    "prompt_tuning": (lambda: deltatune.PromptTuningConfig(num_virtual_tokens=3), "0.4.0"),
    "loha": (lambda: deltatune.LoHaConfig(r=2, target_modules=["q_proj"]), "0.6.0"),
    "oft_exact_cayley": (lambda: deltatune.OFTConfig(oft_block_size=8, use_cayley_neumann=False), "0.16.0"),
    "oft_neumann": (lambda: deltatune.OFTConfig(oft_block_size=8), "0.18.0"),
    "trainable_tokens": (lambda: deltatune.TrainableTokensConfig(token_indices=[3, 5]), "0.15.0"),
}


def reads_as_absent(value: object, absent: object) -> bool:
    """A value the file could have left out (False is not 0, {} is not None)."""
    return type(value) is type(absent) and value == absent


def saved_config(tmp_path: Path, case: str) -> tuple[dict, Path]:
    delta_model = deltatune.attach(build("llama"), SAVED[case][0]())
    delta_model.save(str(tmp_path / case), format="peft")
    return json.loads((tmp_path / case / "adapter_config.json").read_text()), tmp_path / case


@pytest.mark.parametrize("peft_type", list(FIRST_READERS))
def test_the_table_dates_every_key_of_peft_0_21s_config_class_and_no_other(peft_type: str) -> None:
    fields = {field.name for field in dataclasses.fields(CONFIG_CLASSES[peft_type])}
    dated = {*FIRST_KEYS[peft_type], *LATER_KEYS[peft_type]}
    assert fields == dated, (sorted(fields - dated), sorted(dated - fields))


@pytest.mark.parametrize("peft_type", list(FIRST_READERS))
def test_a_key_left_out_reads_as_peft_0_21s_default(peft_type: str) -> None:
    defaults = {field.name: field for field in dataclasses.fields(CONFIG_CLASSES[peft_type])}
    for key, entry in LATER_KEYS[peft_type].items():
        if entry.absent_reads is ALWAYS_WRITTEN:
            continue
        field = defaults[key]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert default == entry.absent_reads, key


@pytest.mark.parametrize("case", list(SAVED))
def test_a_saved_peft_folder_needs_the_release_of_the_newest_option_it_uses(tmp_path: Path, case: str) -> None:
    data, folder = saved_config(tmp_path, case)
    assert minimum_peft_version(folder) == SAVED[case][1]
    later = LATER_KEYS[data["peft_type"]]
    assert [
        key for key, value in data.items() if key in later and reads_as_absent(value, later[key].absent_reads)
    ] == []


LAYER_CASES = {
    "lokr_alpha_is_r": ("llama", lambda: deltatune.LoKrConfig(r=2, alpha=2, target_modules=["q_proj"]), "0.6.0"),
    "lokr_scaled": ("llama", lambda: deltatune.LoKrConfig(r=2, alpha=8, target_modules=["q_proj"]), "0.14.0"),
    "lokr_alpha_pattern": (
        "llama",
        lambda: deltatune.LoKrConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"], alpha_pattern={"q_proj": 4}),
        "0.14.0",
    ),
    "vera_one_shape": ("llama", lambda: deltatune.VeraConfig(r=4, target_modules=["q_proj", "o_proj"]), "0.12.0"),
    "vera_two_shapes": ("llama", lambda: deltatune.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), "0.12.0"),
    "dora_linear": ("llama", lambda: deltatune.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "0.9.0"),
    "dora_embedding": (
        "llama",
        lambda: deltatune.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=True),
        "0.13.0",
    ),
    "dora_gpt2_conv1d": ("gpt2", lambda: deltatune.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True), "0.11.0"),
    "lora_embedding": ("llama", lambda: deltatune.LoraConfig(r=4, target_modules=["embed_tokens"]), "0.4.0"),
}
"""Folders whose release depends on more than their keys: LoKr's scale alpha / r (peft 0.6 to 0.13 leave it out of
ΔW, a silently other model), VeRA over layers of several shapes (0.11 refuses them) and the layer kinds DoRA
wraps (peft 0.9 and 0.10 crash on GPT-2's Conv1D, 0.9 to 0.12 refuse an Embedding)."""


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_a_folder_needs_the_release_that_computes_its_scale_and_wraps_its_layer_kinds(
    tmp_path: Path, case: str
) -> None:
    architecture, make_config, release = LAYER_CASES[case]
    delta_model = deltatune.attach(build(architecture), make_config())
    delta_model.save(str(tmp_path / case), format="peft")
    assert minimum_peft_version(tmp_path / case) == release


CONV_CASES = {
    ("Conv2d", False): "0.4.0",
    ("Conv3d", False): "0.14.0",
    ("Conv1d", False): "0.15.0",
    ("Conv2d", True): "0.10.0",
    ("Conv3d", True): "0.14.0",
    ("Conv1d", True): "0.16.0",
}
"""(convolution, use_dora) → the first release whose LoRA (DoRA) wraps it (read in peft's sources)."""


@pytest.mark.parametrize(("kind", "use_dora"), list(CONV_CASES))
def test_a_lora_on_a_convolution_needs_the_release_that_wraps_its_kind(
    tmp_path: Path, kind: str, use_dora: bool
) -> None:
    from test_peft_custom_model_cases import MODELS

    config = deltatune.LoraConfig(r=2, target_modules=[kind.lower()], use_dora=use_dora)
    deltatune.attach(MODELS[kind].build(), config).save(str(tmp_path / kind), format="peft")
    assert minimum_peft_version(tmp_path / kind) == CONV_CASES[kind, use_dora]


MHA_CASES = {("mha",): "0.15.0", ("mha", "lin0"): "0.15.0", ("lin0",): "0.4.0"}
"""target_modules of the tiny MultiheadAttention model → the first release that loads its LoRA: peft 0.13.2 and 0.14.0
refuse the MultiheadAttention as a target ("is not supported"), 0.15.0 loads it with our outputs (each run once, in
transformers 4.57); its in-projection's `lora_A` is 2-D like a Linear's, so only the keys tell it apart."""


@pytest.mark.parametrize("targets", list(MHA_CASES))
def test_a_lora_on_a_multihead_attention_needs_the_release_that_wraps_it(tmp_path: Path, targets: tuple) -> None:
    from test_peft_custom_model_cases import MODELS

    config = deltatune.LoraConfig(r=2, target_modules=list(targets))
    deltatune.attach(MODELS["MHA"].build(), config).save(str(tmp_path / "mha"), format="peft")
    assert minimum_peft_version(tmp_path / "mha") == MHA_CASES[targets]


@pytest.mark.parametrize("case", list(SAVED))
def test_peft_version_is_written_only_where_the_folder_needs_peft_0_18_anyway(tmp_path: Path, case: str) -> None:
    data, _ = saved_config(tmp_path, case)
    if release_of(SAVED[case][1]) >= (0, 18):
        assert data["peft_version"] == PEFT_VERSION
    else:
        assert "peft_version" not in data


def test_no_layer_kind_needs_the_release_that_reads_peft_version() -> None:
    """`lean_config` judges `peft_version` from the config alone: that holds while no layer kind (nor LoKr's scale,
    0.14) needs 0.18."""
    from deltatune.peft_releases import DORA_LAYER_RELEASES, LORA_LAYER_RELEASES

    newest = max([*DORA_LAYER_RELEASES.values(), *LORA_LAYER_RELEASES.values()], key=release_of)
    assert release_of(newest) < release_of(LATER_KEYS["LORA"]["peft_version"].release)


def test_a_plain_lora_file_holds_only_keys_of_peft_0_4(tmp_path: Path) -> None:
    data, _ = saved_config(tmp_path, "lora")
    assert set(data) <= set(FIRST_KEYS["LORA"])
    assert data["r"] == 4 and data["init_lora_weights"] is True and data["peft_type"] == "LORA"


def test_a_folder_peft_0_21_saved_needs_its_newest_keys_release(tmp_path: Path) -> None:
    model = peft.get_peft_model(copy.deepcopy(build("llama")), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path))
    assert minimum_peft_version(tmp_path) == "0.21.0"  # peft writes every key it has, kasa_config (0.21) too


def test_a_folder_without_a_peft_config_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(AdapterFileError, match="cannot read .*adapter_config.json"):
        minimum_peft_version(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"method": "lora"}))
    with pytest.raises(AdapterFileError, match="has no peft_type"):
        minimum_peft_version(tmp_path)


def test_a_peft_folder_without_weights_is_refused_by_name(tmp_path: Path) -> None:
    folder = saved_config(tmp_path, "lora")[1]
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="holds no adapter_model.safetensors or adapter_model.bin"):
        minimum_peft_version(folder)
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "adapter_config.json"]


def test_the_folders_of_an_unlisted_peft_type_keep_every_key_and_need_no_known_release() -> None:
    from deltatune.peft_releases import lean_config, required_release

    data = {"peft_type": "OUTPUT_GAIN", "peft_version": PEFT_VERSION, "init_gain": 0.0, "modules_to_save": None}
    assert lean_config(data) == data and required_release(data, {}) is None


def test_show_says_which_peft_release_a_peft_folder_needs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from deltatune.train.cli import main

    _, folder = saved_config(tmp_path, "dora")
    assert deltatune.minimum_peft_version(folder) == "0.9.0"
    assert main(["show", str(folder)]) == 0
    assert "loads in peft 0.9.0 or later" in capsys.readouterr().out
