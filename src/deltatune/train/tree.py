"""`deltatune inspect`: the module tree with each module's parameters counted as frozen, trainable
or adapter, and runs of identical blocks folded into one line (SmolLM2 with the demo's LoRA):

    model (LlamaModel)                   frozen 134,515,008  adapter 1,221,120
      embed_tokens (Embedding)           frozen 28,311,552
      layers (ModuleList)                frozen 106,202,880  adapter 1,221,120
        0-14 (LlamaDecoderLayer)         frozen 3,540,096   ×15, each
        15-29 (LlamaDecoderLayer)        frozen 3,540,096  adapter 81,408   ×15, each
    lm_head (Linear)                     (tied to weights counted above: 28,311,552)

A parameter shared by two modules (tied input and output embeddings) is counted once, at the first
module holding it. Adapter parameters are those inside deltatune's sites (found structurally, as
everywhere); trainable ones outside a site are parameters the user unfroze. Numbered siblings (the
blocks of a ModuleList) fold when their module types, parameter shapes and training flags are equal.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..site import DeltaSite


@dataclasses.dataclass(frozen=True)
class Counts:
    frozen: int = 0
    trainable: int = 0
    adapter: int = 0
    tied: int = 0
    """Parameters shared with a module shown earlier (tied embeddings), counted there only."""

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.frozen + other.frozen,
            self.trainable + other.trainable,
            self.adapter + other.adapter,
            self.tied + other.tied,
        )

    def describe(self) -> str:
        parts = [(name, getattr(self, name)) for name in ("frozen", "trainable", "adapter")]
        text = "  ".join(f"{name} {value:,}" for name, value in parts if value)
        if self.tied:
            text += f"  (tied to weights counted above: {self.tied:,})"
        return text.strip() or "no parameters"


class Tree:
    """Counts and lines for one model; each parameter is counted once, at the first module holding it."""

    def __init__(self, model: nn.Module, max_depth: int = 6) -> None:
        self.model, self.max_depth = model, max_depth
        self.owners: dict[int, nn.Module] = {}
        for module in model.modules():
            for parameter in module.parameters(recurse=False):
                self.owners.setdefault(id(parameter), module)

    def counts(self, module: nn.Module, inside_site: bool = False) -> Counts:
        """Parameter counts of `module` and everything below it."""
        own = Counts()
        for parameter in module.parameters(recurse=False):
            size = parameter.numel()
            if self.owners[id(parameter)] is not module:
                own += Counts(tied=size)
            elif inside_site:
                own += Counts(adapter=size)
            elif parameter.requires_grad:
                own += Counts(trainable=size)
            else:
                own += Counts(frozen=size)
        for child in module.children():
            own += self.counts(child, inside_site or isinstance(child, DeltaSite))
        return own

    def lines(self, module: nn.Module, name: str = "", depth: int = 0, inside_site: bool = False) -> list[str]:
        """The indented lines of the tree below `module`, down to `max_depth`."""
        label = f"{name} ({type(module).__name__})" if name else type(module).__name__
        counted = self.counts(module, inside_site)
        if all(self.owners[id(p)] is module for p in module.parameters(recurse=False)):
            counted = dataclasses.replace(counted, tied=0)
        lines = [f"{'  ' * depth}{label:<{max(1, 48 - 2 * depth)}} {counted.describe()}"]
        if depth >= self.max_depth:
            return lines
        children = list(module.named_children())
        index = 0
        while index < len(children):
            child_name, child = children[index]
            run = 1
            while index + run < len(children) and _same_block(children[index + run], children[index]):
                run += 1
            child_site = inside_site or isinstance(child, DeltaSite)
            if run > 1:
                last = children[index + run - 1][0]
                folded = self.lines(child, f"{child_name}-{last}", depth + 1, child_site)
                folded[0] = f"{folded[0].rstrip()}   ×{run}, each"
                lines += folded
            else:
                lines += self.lines(child, child_name, depth + 1, child_site)
            index += run
        return lines


def signature(module: nn.Module) -> tuple:
    """What must be equal for two sibling modules to fold into one line."""
    return (
        type(module),
        tuple((name, tuple(p.shape), p.requires_grad) for name, p in module.named_parameters()),
        tuple(type(m) for m in module.modules()),
    )


def _same_block(first: tuple[str, nn.Module], second: tuple[str, nn.Module]) -> bool:
    """Numbered siblings (the blocks of a ModuleList) with equal signatures fold together."""
    return first[0].isdigit() and second[0].isdigit() and signature(first[1]) == signature(second[1])


def describe_tree(model: nn.Module, max_depth: int = 6) -> str:
    """The whole tree, with the totals on the last line."""
    tree = Tree(model, max_depth)
    total = dataclasses.replace(tree.counts(model), tied=0)
    all_parameters = total.frozen + total.trainable + total.adapter
    share = 100.0 * (total.trainable + total.adapter) / all_parameters if all_parameters else 0.0
    return "\n".join([*tree.lines(model), f"total: {total.describe()}  ({share:.4f}% train)"])
