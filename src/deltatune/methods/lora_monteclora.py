"""MonteCLoRA: LoRA whose A is a Monte Carlo mixture in training (Seth, Pathak, Sengupta et al. 2024, "Robust
and Efficient Fine-tuning of LLMs with Bayesian Reparameterization of Low-Rank Adaptation", arXiv:2411.04358;
peft's `monteclora_config`).

In training, each forward pass of a layer uses, instead of A (rank r × in), the mixture of K noisy copies

    A_train = Σ_n w_n (A + E_n) = A + Σ_n w_n E_n,     E_n[j, i] = c · σ_j · z_n[j, i],   z_n ~ N(0, I)

with c = `sample_scaler`, one standard deviation σ_j per rank row and mixture weights w on the simplex:

    σ_j² = max(exp(2 s_j) · χ_j, 10⁻³)       s = `std_prior` (trained), χ = diag(X Xᵀ), X ~ N(0, 1)^{r×r}
    w = softmax(μ + √(d + 10⁻⁶) ⊙ u)         u ~ N(0, I_K), α = exp(`expert_weights_prior`) (trained),
    μ = log α − mean(log α),  d = (1 − 2/K)/α + Σ(1/α)/K²   (the Laplace approximation of Dirichlet(α))

X Xᵀ is a Wishart(df = r, I) draw; since the variance is taken as diagonal, only its diagonal (χ_j ~ χ²(r),
independent) enters, and only that is drawn. peft draws the whole matrix by Bartlett's decomposition and
then keeps its diagonal as well; peft's Cholesky factors of the two diagonal matrices are their square roots.

The regulariser the user adds to the task loss (`monteclora_loss`, peft's `_get_monteclora_loss`) is, per
layer, λ (KL_dir + KL_wish + KL_mvn) + [Σ w_n² if `use_entropy`], averaged over the layers, λ = `kl_loss_weight`:

    KL_dir  = lgΓ(Σα) − lgΓ(Kβ) + Σ(lgΓ(α) − lgΓ(β)) + Σ (α − β)(ψ(α) − ψ(Σα)),   β = `dirichlet_prior`
    KL_wish = r/2 · Σ_j (exp(2 s_j) − 2 s_j) − r²/2
    KL_mvn  = K/2 · Σ_j (g_j − log g_j − 1),   g_j = max(σ_j², 10⁻⁶) of the latest training call (0 before one)

written as peft computes it (KL_dir's Σ lgΓ terms carry the sign peft gives them; the textbook Dirichlet KL
has the opposite one), with lgΓ computed directly where peft takes log(exp(lgΓ)), which overflows once Σα
passes ~35 in float32. w and σ² of the latest training call are kept for it, as peft keeps them, and copied
into the buffers `expert_weights` and `gaussian_var_prior` (diag(σ²)) that peft's files hold. The regulariser
takes them with their graph once; a later step whose forward does not reach the layer (an MoE expert no
token went to) takes the buffers' detached copies: the value peft computes from its stale σ² and w, without
reaching into a freed graph (the layer still counts in the average, as in peft).

Outside training the layer is plain LoRA, and merging folds ΔW = s·B A. The noise is drawn at each
training call from torch's default generator (so a seeded run repeats, and a checkpoint's random state
resumes it bit-exactly); peft pre-draws `buffer_size` calls' noise, which deltatune reads but has no use
for. peft falls back to A when a draw holds a NaN (a host synchronisation per call); here a NaN reaches
the loss, where `deltatune train` stops. Layers: `nn.Linear`, GPT-2's `Conv1D` and the quantized linears
(peft: its `nn.Linear` layer; its bitsandbytes layers ignore the setting and train plain LoRA).

Memory (`bench/saved_tensors.py --quantize none --dropout 0 --monteclora-samples 8`: SmolLM2-135M, float32,
batch 8 × 64, r = 16 on all seven linears): a training forward keeps 685 MiB for backward against plain
LoRA's 593 MiB (the K draws z of each layer, for w's gradient). peft's count is 11,887 MiB: its pre-drawn
noise (150 calls × K × in × r per layer, the `buffer_size` default) stays resident, ~11 GB for this model.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from ..errors import DeltaTuneError, UnsupportedModuleError
from ..field_check import NonNegativeFloat, PositiveFloat, PositiveInt, check_fields, numbers_from_text
from .lora_data_init import settings_from_dict

if TYPE_CHECKING:
    from ..model import DeltaModel

VARIANCE_FLOOR = 1e-3
"""σ² below this is raised to it (peft's clip of the Wishart draw's diagonal)."""
DIRICHLET_FLOOR = 1e-6
"""α and the Laplace variance d are kept at least this large, and d gets it added (peft's eps)."""
KL_VARIANCE_FLOOR = 1e-6
"""g in KL_mvn is kept at least this large (peft's clamp)."""


@dataclasses.dataclass
class MontecloraConfig:
    """MonteCLoRA's settings; names and defaults follow peft's `MontecloraConfig`."""

    num_samples: PositiveInt = 8
    """K: noisy copies of A mixed at each training call (more: smoother, K × r × in numbers drawn per call)."""
    use_entropy: bool = False
    """Add Σ w_n² to the regulariser, which pushes the mixture weights towards uniform."""
    dirichlet_prior: PositiveFloat = 0.1
    """β, the concentration of the Dirichlet prior over the mixture weights in KL_dir."""
    sample_scaler: NonNegativeFloat = 1e-4
    """c, the scale of the noise on A (0: plain LoRA's forward)."""
    kl_loss_weight: NonNegativeFloat = 1e-5
    """λ, the weight of the three KL terms in `monteclora_loss`."""
    buffer_size: PositiveInt = 150
    """peft's count of calls whose noise it draws ahead; kept for peft's files, unused here (each call draws)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MontecloraConfig:
        return settings_from_dict(
            cls, numbers_from_text(cls, data), "monteclora_config", "peft's MontecloraConfig fields"
        )

    def __post_init__(self) -> None:
        check_fields(self)


def monteclora_config_for_peft(config: Any) -> dict[str, Any] | None:
    """The `monteclora_config` of peft's adapter_config.json for LoraConfig `config`."""
    return None if config.monteclora_config is None else dataclasses.asdict(config.monteclora_config)


def check_monteclora_options(config: Any) -> None:
    """Refuse MonteCLoRA beside the LoRA variants peft does not combine it with."""
    if config.monteclora_config is None:
        return
    others = {
        "use_dora": config.use_dora,
        "use_bdlora": config.use_bdlora is not None,
        "kasa_config": config.kasa_config is not None,
        "velora_config": config.velora_config is not None,
        "init_lora_weights='mica'": config.init_lora_weights == "mica",
    }
    combined = [name for name, used in others.items() if used]
    if combined:
        raise DeltaTuneError(
            f"monteclora_config does not combine with {', '.join(combined)} (peft refuses the combination too): "
            "choose one variant"
        )
    if config.target_parameters:
        raise DeltaTuneError(
            "monteclora_config applies to layers (target_modules), not to target_parameters: drop one of the two"
        )


def add_monteclora(adapter: nn.Module, module: nn.Module, module_name: str, config: Any) -> None:
    """Give a LoRA linear adapter its MonteCLoRA sampler, when `config` asks for one."""
    from .lora import LoraLinear  # lora builds on this module's config

    if config.monteclora_config is None:
        return
    if not isinstance(adapter, LoraLinear):
        raise UnsupportedModuleError(
            f"MonteCLoRA samples the A of linear layers only, not of {module_name} ({type(module).__name__}), as in "
            "peft: leave it out of target_modules (or list it in exclude_modules), or drop monteclora_config"
        )
    adapter.monteclora = MontecloraSampler(adapter.lora_A, config.monteclora_config)


class Draws(NamedTuple):
    """One training call's standard draws (module docstring): z (K × r × in), χ (r), u (K)."""

    standard: torch.Tensor
    wishart_diagonal: torch.Tensor
    mixture: torch.Tensor


class MontecloraSampler(nn.Module):
    """One adapter's MonteCLoRA state at one layer: the trained `std_prior` (s, r entries) and
    `expert_weights_prior` (log α, K entries), and the latest call's σ² and w (module docstring)."""

    def __init__(self, lora_A: torch.Tensor, settings: MontecloraConfig) -> None:
        super().__init__()
        rank = lora_A.shape[0]
        factory = {"dtype": lora_A.dtype, "device": lora_A.device}
        self.num_samples = settings.num_samples
        self.sample_scaler = settings.sample_scaler
        self.kl_loss_weight = settings.kl_loss_weight
        self.dirichlet_prior = settings.dirichlet_prior
        self.use_entropy = settings.use_entropy
        self.std_prior = nn.Parameter(torch.rand(rank, **factory))
        self.expert_weights_prior = nn.Parameter(torch.rand(settings.num_samples, **factory))
        self.register_buffer("gaussian_var_prior", torch.eye(rank, **factory))
        self.register_buffer("expert_weights", torch.full((settings.num_samples,), 1 / settings.num_samples, **factory))
        self.latest: tuple[torch.Tensor, torch.Tensor] | None = None
        """(σ², w) of the latest training call, with their graph, until the regulariser reads them (None: read,
        or no call yet; the regulariser then takes the buffers' detached copies)."""

    def draw(self, lora_A: torch.Tensor) -> Draws:
        """This call's draws from torch's default generator, in A's dtype and on its device."""
        rank, in_features = lora_A.shape
        factory = {"dtype": lora_A.dtype, "device": lora_A.device}
        standard = torch.randn(self.num_samples, rank, in_features, **factory)
        wishart_factor = torch.randn(rank, rank, **factory)
        return Draws(standard, wishart_factor.square().sum(dim=1), torch.randn(self.num_samples, **factory))

    def mixture_weights(self, mixture: torch.Tensor) -> torch.Tensor:
        """w = softmax(μ + √(d + 10⁻⁶) ⊙ u), Dirichlet(α) by its Laplace approximation."""
        alpha = self.expert_weights_prior.exp().clamp_min(DIRICHLET_FLOOR)
        log_alpha = alpha.log()
        count = self.num_samples
        spread = ((1 - 2 / count) / alpha + alpha.reciprocal().sum() / count**2).clamp_min(DIRICHLET_FLOOR)
        return torch.softmax(log_alpha - log_alpha.mean() + (spread + DIRICHLET_FLOOR).sqrt() * mixture, dim=-1)

    def perturbed(self, lora_A: torch.Tensor) -> torch.Tensor:
        """A + c · σ ⊙ Σ_n w_n z_n for this training call, keeping σ² and w for the regulariser."""
        draws = self.draw(lora_A)
        variance = ((2 * self.std_prior).exp() * draws.wishart_diagonal).clamp_min(VARIANCE_FLOOR)
        weights = self.mixture_weights(draws.mixture)
        self.latest = (variance, weights)
        with torch.no_grad():
            self.gaussian_var_prior.copy_(torch.diag(variance))
            self.expert_weights.copy_(weights)
        mixed = torch.einsum("n,nri->ri", weights, draws.standard)
        return lora_A + self.sample_scaler * variance.sqrt()[:, None] * mixed

    def regularizer(self) -> torch.Tensor:
        """λ (KL_dir + KL_wish + KL_mvn) + [Σ w² with `use_entropy`] (module docstring); 0 outside training."""
        if not self.training:
            return torch.zeros((), device=self.std_prior.device)
        alpha = self.expert_weights_prior.exp()
        prior = torch.full_like(alpha, self.dirichlet_prior)
        total = alpha.sum()
        dirichlet = (
            torch.lgamma(total)
            - torch.lgamma(prior.sum())
            + (torch.lgamma(alpha) - torch.lgamma(prior)).sum()
            + ((alpha - prior) * (torch.digamma(alpha) - torch.digamma(total))).sum()
        )
        rank = self.std_prior.shape[0]
        std_variance = (2 * self.std_prior).exp()
        wishart = 0.5 * rank * (std_variance - 2 * self.std_prior).sum() - 0.5 * rank**2
        variance, weights = self.latest or (self.gaussian_var_prior.diagonal(), self.expert_weights)
        self.latest = None  # their graph belongs to one forward: a step that skips this layer takes the buffers
        variance = variance.clamp_min(KL_VARIANCE_FLOOR)
        gaussian = 0.5 * self.num_samples * (variance - variance.log() - 1).sum()
        loss = self.kl_loss_weight * (dirichlet + wishart + gaussian)
        return loss + weights.square().sum() if self.use_entropy else loss

    def __getstate__(self) -> dict[str, Any]:
        """A copy (`copy.deepcopy`, pickling) leaves the latest call's σ² and w behind: they belong to that
        call's graph, which torch cannot copy."""
        return {**super().__getstate__(), "latest": None}

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, sample_scaler={self.sample_scaler:g}"


def monteclora_loss(delta_model: DeltaModel, name: str | None = None) -> torch.Tensor:
    """The MonteCLoRA regulariser of adapter `name` (default: the active adapters), averaged over their
    MonteCLoRA layers (peft's `_get_monteclora_loss`); 0 without such layers or outside training. Add it
    to the task loss after the forward pass (it reads that pass's σ² and w)."""
    names = [name] if name is not None else list(delta_model.active_adapters)
    terms = [
        sampler.regularizer()
        for _, site in delta_model.sites()
        for adapter_name in names
        if adapter_name in site.adapters
        and (sampler := getattr(site.adapters[adapter_name], "monteclora", None)) is not None
    ]
    return torch.stack(terms).mean() if terms else torch.zeros(())
