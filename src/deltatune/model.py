"""`DeltaModel`: a model with named adapters that can be added, activated, merged, saved and removed.

The base model stays what it was: its modules and code are untouched; each adapted module gains a
`deltatune` child (a `DeltaSite`) and a forward hook. Every base parameter is frozen at attach and its
`requires_grad` restored by `unload()`. Attribute look-ups the wrapper does not answer (`config`,
`get_input_embeddings`, ...) go to the base model, so transformers code keeps working. On a float16 /
bfloat16 model, adapters keep float32 weights (`add(..., autocast_adapter_dtype=True)`, peft's default);
`autocast_adapter_dtype=False` keeps them in the model's dtype. What transformers' and TRL's trainers ask of a
model (`get_base_model`, `disable_adapter`, gradient checkpointing, `save_pretrained` writing the adapter folder)
is in `trainer_support`; merging, unloading and combining adapters in `model_merging`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .base_fingerprint import fingerprint
from .composition import ActivePlan, Fuse, Setup, site_names
from .config import DeltaConfig
from .errors import AdapterNameError, DeltaTuneError
from .methods.module_copy import ModuleCopy
from .model_merging import Merging
from .names import check_name
from .placement import Placement
from .registry import method_for
from .site import DeltaSite, RoutingState, remove_adapter, site_of
from .site_adapter import SiteAdapter, keep_in_float32
from .summary import TrainableSummary
from .targeting import model_modules, saved_module_names
from .trainer_support import TrainerFacing


@dataclasses.dataclass
class AdapterRecord:
    """What a `DeltaModel` knows of one adapter besides its modules: its config, the modules its method
    adapted (`targets`) and every module that holds a part of it (`placed`, `modules_to_save` too)."""

    config: DeltaConfig
    targets: list[str]
    placed: list[str]
    base_fingerprint: dict[str, Any]
    """The print of the base weights at its targets (`base_fingerprint`): taken when it was added, or read
    from the folder it was loaded from, so a save records the base it was trained on."""


class DeltaModel(Merging, TrainerFacing, nn.Module):
    """A base model plus named adapters. Create it with `deltatune.attach` or `deltatune.load`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, DeltaModel) or any(isinstance(module, DeltaSite) for module in model.modules()):
            raise DeltaTuneError(
                "this model already has deltatune adapters: add more with delta_model.add(name, config)"
            )
        self.base_model = model
        self.records: dict[str, AdapterRecord] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.plan = ActivePlan((), [])
        self._call_enders: list[SiteAdapter] = []
        """The adapters with a `call_ended`, run at the end of every call too (kept by `activate`)."""
        self.routing = RoutingState()
        self._base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self._modules["base_model"], name)

    @property
    def configs(self) -> Mapping[str, DeltaConfig]:
        """{adapter name: config}, read-only (in the order the adapters were added)."""
        return MappingProxyType({name: record.config for name, record in self.records.items()})

    @property
    def targets(self) -> Mapping[str, list[str]]:
        """{adapter name: full names of the modules its method adapted}, read-only."""
        return MappingProxyType({name: record.targets for name, record in self.records.items()})

    # ----------------------------------------------------------------------------- adapters
    def add(
        self,
        name: str,
        config: DeltaConfig,
        trainable: bool = True,
        autocast_adapter_dtype: bool = True,
        weights_from_file: bool = False,
    ) -> DeltaModel:
        """Add adapter `name` built from `config`. The first adapter becomes active. `weights_from_file`:
        the weights are copied in from a file right after (as `load` does), so an initialisation that
        needs data (a tokenizer for prompt tuning's TEXT init) is skipped."""
        check_name(name)
        if name in self.records:
            raise AdapterNameError(
                f"adapter name {name!r} is not free; taken: {sorted(self.records)}; pick another name"
            )
        if not isinstance(config, DeltaConfig):
            raise DeltaTuneError(
                f"expected a deltatune config (LoraConfig, BitFitConfig, ...), got {type(config).__name__}"
            )
        method = method_for(config)
        placement = Placement(self.base_model, name, self.routing, weights_from_file)
        previous = self.active_adapters
        try:
            method.attach(placement, config)
            for saved in saved_module_names(self.base_model, config):
                placement.put(saved, ModuleCopy(self.base_model.get_submodule(saved), saved), target=False)
            if autocast_adapter_dtype:  # float16 / bfloat16 adapter weights in float32, as peft does
                for module_name in placement.placed:
                    keep_in_float32(site_of(self.base_model.get_submodule(module_name)).adapters[name])
            targets = list(placement.targets)
            self.records[name] = AdapterRecord(
                config, targets, list(placement.placed), fingerprint(self.base_model, targets)
            )
            self.set_trainable(name, trainable)
            self._reactivate(previous or (name,))
        except BaseException:
            placement.undo()
            if self.records.pop(name, None) is not None:  # the adapters active before run again
                self.activate(
                    *previous, skip_layers=self.plan.skip_layers, train_skip_lowest=self.plan.train_skip_lowest
                )
            raise
        return self

    def replace_config(self, name: str, config: DeltaConfig) -> None:
        """Record a new config for adapter `name` whose modules changed in place to fit it (a soft
        prompt's encoder collapsed into its table)."""
        self.require([name])
        self.records[name].config = config

    def activate(self, *setup: str | Setup, skip_layers: Iterable[int] = (), train_skip_lowest: int = 0) -> DeltaModel:
        """Run these adapters on every forward call: names (all at once, in this order: for bottleneck
        adapters one after the other, as `Stack`), `deltatune.Stack(...)` or `deltatune.Fuse(...)`.
        `skip_layers`: blocks whose adapters do not run (AdapterDrop); `train_skip_lowest=k`: in
        training, also skip the adapters of a random number (0..k) of lowest blocks on each call."""
        names = site_names(setup, self._fusion_name)
        self.require(names)
        for name in self._base_trainers():
            if name not in names:
                raise DeltaTuneError(
                    f"activating adapters without {name!r} needs the base model, and {name!r} "
                    f"({self.records[name].config.method}) trains the base's own weights, so none is kept; activate "
                    f"{name!r} with the others, or load the base model afresh"
                )
        if any(site.merged for _, site in self.sites()) and set(names) != set(self.active_adapters):
            raise DeltaTuneError(
                "adapters are merged into the weights: call unmerge() before changing the active adapters"
            )
        self.active_adapters = names
        self.plan = ActivePlan(
            names,
            self._site_layers(bool(skip_layers) or train_skip_lowest > 0),
            frozenset(skip_layers),
            train_skip_lowest,
        )
        self.plan.apply()
        self._call_enders = [adapter for _, site in self.sites() for adapter in site.call_enders]
        return self

    def fuse(self, *adapters: str, name: str | None = None, dropout: float = 0.0) -> DeltaModel:
        """Add AdapterFusion layers over trained bottleneck adapters (named `name`, default "a,b"),
        freeze those adapters, and activate `Fuse(*adapters)`: only the fusion weights train."""
        from .methods.fusion import FusionConfig

        self.require(adapters)
        self.add(name or ",".join(adapters), FusionConfig(adapters=list(adapters), dropout=dropout))
        for adapter in adapters:
            self.set_trainable(adapter, False)
        return self.activate(Fuse(*adapters))

    def _fusion_name(self, fuse: Fuse) -> str:
        from .methods.fusion import fusion_name

        return fusion_name(self.configs, fuse)

    def _reactivate(self, names: Iterable[str]) -> None:
        """Activate `names` again, keeping the AdapterDrop settings."""
        self.activate(*names, skip_layers=self.plan.skip_layers, train_skip_lowest=self.plan.train_skip_lowest)

    def _site_layers(self, need_layers: bool) -> list[tuple[DeltaSite, int | None]]:
        """Every site with its block index (found only when AdapterDrop needs it): the index recorded at
        placement, else the block of the model that holds the site's module."""
        if not need_layers:
            return [(site, None) for _, site in self.sites()]
        from .architectures import block_names, layer_of

        sites = list(self.sites())
        blocks = block_names(self.base_model) if any(site.layer is None for _, site in sites) else []
        return [
            (site, site.layer if site.layer is not None else layer_of(blocks, module_name))
            for module_name, site in sites
        ]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside the block the model computes as the base model (unmerged adapters are skipped)."""
        self._refuse_without_base("disabled()")
        if any(site.merged for _, site in self.sites()):
            raise DeltaTuneError("adapters are merged into the weights: call unmerge() before disabling them")
        previous, self.routing.disabled = self.routing.disabled, True
        try:
            yield
        finally:
            self.routing.disabled = previous

    def delete(self, name: str) -> None:
        """Remove adapter `name` everywhere (it is unmerged first if merged). An adapter that trains the
        base's own weights (full fine-tuning) is refused: its weights would stay, as the base."""
        self.require([name])
        if name in self._base_trainers():
            self._refuse_without_base(
                f"delete({name!r})", "unload() gives the tuned model; load the base afresh for the base"
            )
        self._withdraw(name)

    def _withdraw(self, name: str) -> None:
        """Remove adapter `name` as `delete` does, for every method: only for an adapter whose weights
        nothing has changed since `add` (a load refused before its first copy), so that a full
        fine-tuning adapter's weights are still the base's."""
        self.require([name])
        if any(name in site.merged for _, site in self.sites()):
            self.unmerge()
        try:
            self._remove(name)
        finally:
            self._reactivate(n for n in self.active_adapters if n != name)

    def _remove(self, name: str) -> None:
        """Take adapter `name` off every module that holds a part of it (each part's `close()` runs).
        A `close()` that raises does not stop the removal: the adapter leaves every module, then the
        first failure is raised."""
        record = self.records.pop(name)
        failure: tuple[str, BaseException] | None = None
        for module_name in reversed(record.placed):
            try:
                remove_adapter(self.base_model.get_submodule(module_name), name)
            except Exception as error:
                failure = failure or (module_name, error)
        if failure is not None:
            module_name, error = failure
            raise DeltaTuneError(
                f"adapter {name!r} was removed from every module, but closing its part at {module_name!r} failed: "
                f"{type(error).__name__}: {error}"
            ) from error

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        """Turn training of adapter `name`'s parameters on or off."""
        for parameter in self.adapter_parameters(name):
            parameter.requires_grad_(trainable)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The parameters of adapter `name`, found through the sites that hold it."""
        self.require([name])
        seen: set[int] = set()  # a parameter shared by the sites of one adapter (Compacter's rule) counts once
        for _, site in self.sites():
            if name in site.adapters:
                for parameter in site.adapters[name].parameters():
                    if id(parameter) not in seen:
                        seen.add(id(parameter))
                        yield parameter

    def sites(self) -> Iterator[tuple[str, DeltaSite]]:
        """(full module name, site) for every adapted module of the base model."""
        for module_name, module in model_modules(self.base_model):
            site = site_of(module)
            if site is not None:
                yield module_name, site

    # ----------------------------------------------------------------------------- running
    def forward(self, *args: Any, adapter_names: list[str | None] | None = None, **kwargs: Any) -> Any:
        """The base model's forward. `adapter_names` gives each row its adapter (`None`: base model)."""
        with self._call(adapter_names, args, kwargs):
            if self.plan.train_skip_lowest:
                self.plan.before_call(self.training)
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str | None] | None = None, **kwargs: Any) -> Any:
        """The base model's `generate`, with optional per-row adapters as in `forward`: one name per
        prompt (the beams and return sequences of a prompt run its adapter)."""
        with self._call(adapter_names, args, kwargs):
            return self.base_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _call(self, adapter_names: list[str | None] | None, args: tuple, kwargs: dict) -> Iterator[None]:
        """One forward or generate call: row i of its input goes to `adapter_names[i]`, or every row to
        the active adapters. Nothing of the call outlives it, even one that raised: its routing ends (a
        later direct call to an inner module runs the active adapters on every row), and every adapter
        drops what it kept of the call (`call_ended`: a tapped input whose reader never ran)."""
        if adapter_names is not None:
            self._check_rows(adapter_names, args, kwargs)
            self.routing.set_rows(list(adapter_names))
        try:
            yield
        finally:
            if adapter_names is not None:
                self.routing.set_rows(None)
            for adapter in self._call_enders:
                adapter.call_ended()

    def _check_rows(self, adapter_names: list[str | None], args: tuple, kwargs: dict) -> None:
        """Refuse `adapter_names` unless it names known adapters, one per row of the call's input."""
        if isinstance(adapter_names, str):
            raise DeltaTuneError(
                "adapter_names must be a list with one adapter name (or None) per row, got the string "
                f"{adapter_names!r}"
            )
        self.require([name for name in adapter_names if name is not None])
        self._refuse_without_base("a mixed batch (adapter_names)", "run the tuned model on the whole batch")
        rows = _batch_size(args, kwargs)
        if rows is not None and len(adapter_names) != rows:
            raise DeltaTuneError(
                f"adapter_names has {len(adapter_names)} entries for a batch of {rows} rows; pass one adapter "
                "name (or None for the base model) per row"
            )

    # ----------------------------------------------------------------------------- files
    def save(
        self,
        path: str,
        names: list[str] | None = None,
        format: str = "deltatune",
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Write adapters to the folder `path` (one adapter: the folder itself; several: one
        subfolder each), each with a model card (`README.md`; `metrics`: final metrics it lists).
        `format="peft"` writes files that `peft.PeftModel.from_pretrained` reads, `format="adapterhub"`
        (bottleneck, MAM and ReFT adapters) what AdapterHub's `load_adapter(path, use_safetensors=True)` reads.
        The folder is replaced in one step and then holds exactly these adapters: adapter files, cards
        and subfolders of earlier saves go, other files (a README of the user's) stay."""
        from .io import save_adapters

        save_adapters(self, path, list(self.records) if names is None else list(names), format, metrics)

    def trainable_summary(self) -> TrainableSummary:
        """Trainable and total parameter counts, overall and per adapter."""
        return TrainableSummary.of(self)

    def _refuse_without_base(self, what: str, instead: str = "load the base model afresh to run it") -> None:
        """Refuse `what`, which needs the untouched base, on a model one of whose adapters trains the
        base's own weights (a method with `trains_base`: full fine-tuning), so that no base is kept."""
        name = next(iter(self._base_trainers()), None)
        if name is not None:
            raise DeltaTuneError(
                f"{what} needs the base model, and adapter {name!r} ({self.records[name].config.method}) trains the "
                f"base's own weights, so none is kept; {instead}"
            )

    def _base_trainers(self) -> list[str]:
        """The adapters whose method trains the base's own weights (`trains_base`: full fine-tuning)."""
        return [
            name for name, record in self.records.items() if getattr(method_for(record.config), "trains_base", False)
        ]

    def require(self, names: Iterable[str]) -> None:
        """Raise `AdapterNameError` unless this model has an adapter of each of `names`."""
        unknown = [name for name in names if name not in self.records]
        if unknown:
            raise AdapterNameError(f"no adapter named {unknown[0]!r}; this model has {sorted(self.records)}")


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The rows of a call's input: `input_ids` or `inputs_embeds` (generate's `inputs`), else its first
    tensor argument; None when it has no tensor."""
    named = [kwargs.get(key) for key in ("input_ids", "inputs_embeds", "inputs")]
    first = next(
        (value for value in (*named, *args, *kwargs.values()) if isinstance(value, torch.Tensor) and value.dim() > 0),
        None,
    )
    return None if first is None else first.shape[0]
