"""The losses of the loop, as small pure functions, and the registry of generator losses.

Notation: x = G(z, c) a batch of generator samples, σ a per-sample noise level, ε ~ N(0, I), x_t = x + σε,
D_r = teacher(x_t, σ, c), D_f = fake(x_t, σ, c) (the fake score trained online on G's samples). Scores are
s = (D − x_t)/σ², so D_r − D_f = σ² (s_r − s_f). Every generator loss is a sum over a sample's elements and a
mean over the batch; its gradient with respect to x is what the generator receives.

A generator loss is registered as a `GeneratorLoss`: the pure function of (x, D_r, D_f, σ, options), and a
declaration of what it needs (gradients into x through the networks' inputs, real data, a discriminator head)
and of its defaults (σ distributions, generator loss scale, σ_init for distillation, its own options). The loop
and `generator_grad` both evaluate it with `generator_objective`, so a gradient checked here is the one the
loop applies. An adversarial term (a discriminator on the fake network's features) adds to the score part
in the loop; a loss that needs one says so with `needs_discriminator` (or, for some of its options only,
`discriminator_when`).
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)²  (Karras et al. 2022, eq. 8 / Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoising_loss(denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_data: float
                   ) -> torch.Tensor:
    """Fake-score (denoising score matching) loss in EDM form, summed over the sample's elements and
    averaged over the batch:  L(φ) = E λ(σ) ‖D_φ(x_0 + σε, σ) − x_0‖²  (Diff-Instruct Alg. 1, EDM eq. 2).
    `x0` must be detached (the generator gets no gradient from this loss)."""
    w = _per_sample(edm_weight(sigma, sigma_data), x0)
    return (w * (denoised - x0) ** 2).flatten(1).sum(1).mean()


def _mean_abs(v: torch.Tensor) -> torch.Tensor:
    """sg[mean_{CHW} |v|] per sample, floored at 1e-5 (SiD sid_loss.py `weight_factor`)."""
    return _per_sample(v.detach().abs().flatten(1).mean(1).clamp_min(1e-5), v)


def _batch_sum(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).sum(1).mean()


def ikl_loss(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor, sigma: torch.Tensor
             ) -> torch.Tensor:
    """Diff-Instruct generator surrogate (Luo et al. 2023, Thm 3.1, with w(t) = σ² in score space):

        L(θ) = (1/N) Σ_n ⟨sg[D_f − D_r], x_n⟩,   so  ∇_x L = (D_f − D_r)/N = σ² (s_f − s_r)/N.
    The official code's `gloss` (pkulwj1994/diff_instruct training/di_loss.py, weight 1 on the denoiser
    difference).
    Defaults: ln σ ~ N(−1.2, 1.2²) for both steps, σ_init 1.0 (Diff-Instruct README)."""
    g = (d_fake - d_real).detach()
    return _batch_sum(g * x)


def dmd_loss(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """DMD / DMD2 (Yin et al. 2024) distribution-matching gradient: the IKL direction divided per sample
    by mean_{CHW} |x − D_r| (tianweiy/DMD2 main/edm/edm_guidance.py):  g = (D_f − D_r) / mean|x − D_r|,
    L = ⟨sg[g], x⟩ / N  (same gradient as DMD2's 0.5·‖x − sg[x − g]‖² up to their mean-vs-sum scaling).
    Defaults: σ uniform over the Karras grid of 1000 levels, indices 20..980 (edm_guidance.py), both steps."""
    norm = (x - d_real).detach().abs().flatten(1).mean(1).clamp_min(1e-8)
    g = (d_fake - d_real).detach() / _per_sample(norm, x)
    return _batch_sum(g * x)


def sid_loss(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor, sigma: torch.Tensor,
             alpha: float = 1.2) -> torch.Tensor:
    """Score identity Distillation (Zhou et al. 2024, ICML, eq. 23 with their α; mingyuanzhou/SiD
    training/sid_loss.py `generator_loss`):

        L(θ) = (1/N) Σ_n (D_r − D_f)ᵀ[(D_r − x) − α(D_r − D_f)] / sg[mean_{CHW}|x − D_r|]

    where D_r and D_f are functions of x through x_t = x + σε: gradients flow into x through both networks'
    inputs and directly, never into their weights (teacher frozen, fake score in eval mode without
    gradients). `d_real` and `d_fake` must therefore be computed from x with autograd on
    (`GeneratorLoss.input_grad`). α = 1.2 (run_sid.sh); α = 1 is the paper's theory-driven value.
    Defaults (run_sid.sh, sid_train.py): generator σ from t ~ U[0, t_max/1000] on the Karras ρ=7 schedule
    with t_max = 800; fake-score σ from EDM's ln σ ~ N(−1.2, 1.2²); generator loss scale 100 (`--lsg`);
    σ_init 2.5; Adam (0, 0.999) for both networks; samples whose x, D_r or D_f hold NaN are dropped
    (the sum is still divided by the full batch). Network modes (sid_training_loop.py), as the loop has them:
    generator step G train, fake score eval without weight gradients, teacher eval; fake step G eval,
    fake score train. Not reproduced: SiD's nan_to_num on the weight gradients (the loop skips a step whose
    gradient is not finite instead), Adam eps 1e-6 under fp16."""
    a = d_real - d_fake
    return _batch_sum(a * ((d_real - x) - alpha * a) / _mean_abs(x - d_real))


def _score_implicit(x: torch.Tensor, d_real: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_n ⟨sg[direction_n], D_r(x_t) − x_n⟩ / sg[mean|x_n − D_r|] with D_r a function of x: the
    score-gradient surrogate shared by `sim` and `uni` (derivation in `sim_loss`)."""
    return _batch_sum(direction.detach() * (d_real - x) / _mean_abs(x - d_real))


def sim_loss(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor, sigma: torch.Tensor,
             huber_c: float = 0.00054) -> torch.Tensor:
    """Score Implicit Matching with the pseudo-Huber distance (Luo et al. 2024, arXiv 2410.16794, §3.2–3.3;
    no official training code). Divergence, in denoiser units y = D_r − D_f = σ²(s_r − s_f):

        D(θ) = E_{σ, x_t ~ q_θ,σ} w(σ) d(y(x_t)),   d(y) = √(‖y‖² + c²) − c,   c = huber_c·√dim.

    Derivation followed (SIM's score-gradient theorem, paper §3.2, written in denoiser units): differentiating
    E_{q_θ} d(s_p − s_qθ) in θ, the term through s_qθ is rewritten with the denoising identity
    s_qθ(x_t) = E[(x − x_t)/σ² | x_t]; what remains is the gradient of the tractable surrogate

        L(θ) = E ⟨sg[d′(y)], D_r(x_t) − x⟩ / σ⁴·(weights),    d′(y) = y / √(‖y‖² + c²),

    with x_t = x + σε a function of θ through x, gradients into x directly and through the teacher's input
    (the fake score only enters through the stopped d′(y), so it is evaluated without gradients). Check by
    hand: for d = ‖·‖² (d′ = 2y) and Gaussian p_σ = N(m, (s²+σ²)I), q_σ = N(μ, (s²+σ²)I) the surrogate's
    gradient in μ is exactly ∂/∂μ of the Fisher divergence ‖m − μ‖²/(s²+σ²)² (tests/test_losses.py).
    Special cases: c → ∞ gives d ≈ ‖y‖²/(2c), the squared-L2 (Fisher) divergence that SIM names SiD as an
    instance of; c → 0 gives the (non-squared) norm ‖y‖.
    Choices the paper leaves to us here: w(σ)/σ⁴ is replaced by SiD's per-sample 1/sg[mean|x − D_r|] (SIM's
    image experiments follow SiD's setup), and c defaults to 0.00054·√dim, the pseudo-Huber constant of
    improved consistency training (Song & Dhariwal 2023) for data in [−1, 1]. σ and σ_init as SiD's."""
    y = (d_real - d_fake).detach()
    c = huber_c * math.sqrt(y[0].numel())
    norm = y.flatten(1).square().sum(1).add(c * c).sqrt()
    return _score_implicit(x, d_real, y / _per_sample(norm, y))


UNI_DIVERGENCES = ("rkl", "fkl", "js")
LOG_RATIO_CLAMP = 10.0  # |log r| at most this (SiDA clamps its discriminator logits to [−10, 10] likewise)


def uni_weight(log_ratio: torch.Tensor | None, divergence: str) -> torch.Tensor | None:
    """h(r) = f″(r)·r² for r = p_σ/q_σ, divided by its batch mean (self-normalised; see `uni_loss`):
    reverse KL f = −log r: h = 1; forward KL f = r log r: h = r; Jensen–Shannon f = r log r − (1 + r) log((1 + r)/2):
    h = r/(1 + r) = sigmoid(log r). None for rkl (no weight); a ValueError when fkl / js get no ratio."""
    if divergence == "rkl":
        return None
    if log_ratio is None:
        raise ValueError(f"--divergence {divergence} weighs samples by the density ratio p/q: give log_ratio (per "
                         "sample log p/q, e.g. a discriminator's logit), or use --divergence rkl")
    logit = log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    h = logit.exp() if divergence == "fkl" else torch.sigmoid(logit)
    return h / h.mean()


def uni_loss(x: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor, sigma: torch.Tensor,
             divergence: str = "rkl", log_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Uni-Instruct (Wang et al. 2025, arXiv 2505.20755; no official code found), the score part, with the
    density ratio of a discriminator for the forward-KL and Jensen–Shannon members.

    Derivation followed. p_σ = teacher (data) marginal, q_σ = the generator's, both diffused by x_t = x + σε;
    r = p_σ/q_σ; D_f(p‖q) = E_q f(r). Along the heat flow ∂_{σ²} p = ½Δp (same for q) one has
    d/dσ² D_f(p_σ‖q_σ) = −½ E_q[f″(r) ‖∇r‖²] = −½ E_q[h(r) ‖s_p − s_q‖²], h(r) = f″(r) r² (∇r = r (s_p − s_q)), so
    the paper's diffusion expansion of the f-divergence (its Thm 3.1) reads
        D_f(p_0‖q_0) = ½ ∫ E_{q_σ}[h(r) ‖s_p − s_q‖²] dσ²:
    a σ-integral of Fisher divergences weighted by h(r), which is 1 for reverse KL (SIM/SiD's L2 case), r for
    forward KL and r/(1 + r) for Jensen–Shannon. Its θ-gradient (the paper's Thm 3.2) has a part through the
    scores, which SIM's score-projection identity makes tractable, and parts through r. We keep the former with
    h(r) held fixed at the current ratio: the score-implicit surrogate of `sim_loss` with d = ‖·‖² and the
    per-sample weight sg[h(r)]; in denoiser units y = D_r − D_f = σ²(s_p − s_q):

        L(θ) = (1/N) Σ_n sg[h(r_n)/h̄] ⟨sg[D_r − D_f], D_r(x_t) − x⟩ / sg[mean|x − D_r|],   h̄ = (1/N) Σ_n h(r_n),

    gradients into x directly and through the teacher's input. r comes from `log_ratio` (per sample log p/q at
    x_t and σ): in the loop, the logit of a discriminator trained with the logistic loss to tell real images
    (at the same σ) from the generator's, whose optimum is exactly log p_σ/q_σ (refiner.adversarial, kind
    'uni'). For rkl the ratio is not needed and the loss is unchanged by it.
    Choices where the paper is open to us (or we could not read its details): (1) the terms of the gradient
    through r itself are dropped (h is stopped, like f-distill's weighting of the DMD gradient, Xu et al.
    2025); (2) the weights are divided by their batch mean (each process's own batch under data parallelism;
    self-normalised importance weights: E_q[r] = 1 for the exact ratio), which makes a constant error in the
    discriminator's bias harmless and keeps the gradient's scale that of rkl; log r is clamped to [−10, 10];
    (3) the discriminator is SiDA's parameter-free head (the channel mean of the fake network's bottleneck,
    trained through the fake network with SiDA's discriminator loss), and no adversarial term is added to the
    generator's loss; (4) SIM's stop-gradient form rather than SiD's α form, SiD's per-sample normalisation,
    σ distributions and σ_init 2.5. The divergence defaults to rkl because it needs no real data."""
    w = uni_weight(log_ratio, divergence)
    y = d_real - d_fake
    return _score_implicit(x, d_real, y if w is None else _per_sample(w.to(y), x) * y)


# ---------------------------------------------------------------------------------------------------------
# The registry

@dataclass(frozen=True)
class GeneratorLoss:
    """A generator loss and what it needs. `defaults` are TrainConfig fields the loss sets unless the user
    does (after the job's defaults and a preset); `options` are its own options (the CLI names with '_')
    and their defaults; `sigma_init` is the generator's σ_init for `refiner distill` (None: the preset's)."""

    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    source: str
    input_grad: bool = False  # D_r, D_f carry gradients into x through the networks' inputs (weights frozen)
    drop_nonfinite: bool = False  # drop samples whose x, D_r or D_f are not finite (SiD's NaN filter)
    needs_data: bool = False  # real images (adversarial losses)
    needs_discriminator: bool = False  # a discriminator head on the fake network (adversarial losses)
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    sigma_init: float | None = None
    check: Callable[[dict[str, Any]], str | None] = lambda options: None  # a message if options are invalid
    tensor_options: tuple[str, ...] = ()  # per-sample tensors the loop (a discriminator) may pass, not CLI options
    discriminator_options: tuple[str, ...] = ()  # of `options`: the discriminator's (refiner.adversarial), not fn's
    # A loss that needs real data and a discriminator only with some of its options (uni --divergence fkl|js).
    discriminator_when: Callable[[dict[str, Any]], bool] | None = None

    def uses_discriminator(self, options: dict[str, Any] | None = None) -> bool:
        """Whether a run with these options trains a discriminator on real data (and so needs --data)."""
        return self.needs_discriminator or (self.discriminator_when is not None
                                             and self.discriminator_when(self.resolve(options or {})))

    def uses_data(self, options: dict[str, Any] | None = None) -> bool:
        """Whether a run with these options reads real samples (--data, or the toy's target)."""
        return self.needs_data or self.uses_discriminator(options)

    def resolve(self, options: dict[str, Any]) -> dict[str, Any]:
        """Its options with defaults filled in; ValueError for an option it does not take."""
        unknown = sorted(set(options) - set(self.options) - set(self.tensor_options))
        if unknown:
            raise ValueError(f"loss {self.name} takes no option {', '.join(unknown)} "
                             f"(its options: {', '.join(self.options) or 'none'})")
        resolved = {**self.options, **options}
        message = self.check(resolved)
        if message:
            raise ValueError(message)
        return resolved


def _check_uni(o: dict[str, Any]) -> str | None:
    if o["divergence"] not in UNI_DIVERGENCES:
        return f"--divergence must be one of {', '.join(UNI_DIVERGENCES)} (got {o['divergence']!r})"
    return None


_EDM_LOGNORMAL = {"p_mean": -1.2, "p_std": 1.2}
_SID_SIGMA = {"sigma": "karras-t", "t_max": 800.0, "fake_sigma": "lognormal", **_EDM_LOGNORMAL}
_SAME = {"fake_sigma": "same"}

GENERATOR_LOSSES: dict[str, GeneratorLoss] = {spec.name: spec for spec in (
    GeneratorLoss("ikl", ikl_loss, "Diff-Instruct's integral KL (Luo et al. 2023)",
                  "pkulwj1994/diff_instruct training/di_loss.py; Diff-Instruct Thm 3.1",
                  defaults={"sigma": "lognormal", **_SAME, "loss_scale": 1.0}),
    GeneratorLoss("dmd", dmd_loss, "DMD's normalised IKL (Yin et al. 2024)",
                  "tianweiy/DMD2 main/edm/edm_guidance.py (distribution-matching loss)",
                  defaults={"sigma": "karras", **_SAME, "levels": 1000, "min_percent": 0.02, "max_percent": 0.98,
                            "loss_scale": 1.0}),
    GeneratorLoss("sid", sid_loss, "Score identity Distillation (Zhou et al. 2024)",
                  "mingyuanzhou/SiD training/sid_loss.py, sid_training_loop.py, run_sid.sh",
                  input_grad=True, drop_nonfinite=True, options={"alpha": 1.2},
                  defaults={**_SID_SIGMA, "loss_scale": 100.0}, sigma_init=2.5),
    GeneratorLoss("sim", sim_loss, "Score Implicit Matching, pseudo-Huber (Luo et al. 2024)",
                  "arXiv 2410.16794 §3 (no official training code)",
                  input_grad=True, drop_nonfinite=True, options={"huber_c": 0.00054},
                  defaults={**_SID_SIGMA, "loss_scale": 1.0}, sigma_init=2.5,
                  check=lambda o: None if o["huber_c"] > 0 else f"--huber-c must be > 0 (got {o['huber_c']})"),
    GeneratorLoss("uni", uni_loss, "Uni-Instruct, score part; fkl/js weighted by a discriminator's density ratio "
                  "(Wang et al. 2025)", "arXiv 2505.20755 (f-divergence expansion; no official code found)",
                  input_grad=True, drop_nonfinite=True, options={"divergence": "rkl"}, tensor_options=("log_ratio",),
                  defaults={**_SID_SIGMA, "loss_scale": 1.0}, sigma_init=2.5,
                  check=_check_uni, discriminator_when=lambda o: o["divergence"] != "rkl"),
    GeneratorLoss("dmd2", dmd_loss, "DMD2: dmd plus a GAN head on the fake network's bottleneck (Yin et al. 2024)",
                  "tianweiy/DMD2 main/edm/edm_guidance.py, train_edm.py, experiments/imagenet/*.sh",
                  needs_data=True, needs_discriminator=True,
                  options={"gan_weight": 3e-3, "disc_weight": 1e-2, "gan_levels": 1000},
                  discriminator_options=("gan_weight", "disc_weight", "gan_levels"),
                  defaults={"sigma": "karras", "fake_sigma": "karras-t", "levels": 1000, "min_percent": 0.02,
                            "max_percent": 0.98, "t_max": 1000.0, "loss_scale": 1.0, "ratio": 5, "grad_clip": 10.0,
                            "betas": (0.9, 0.999)}, sigma_init=80.0,
                  check=lambda o: _check_discriminator(o)),
    GeneratorLoss("sida", sid_loss, "SiDA: sid plus an adversarial term on the fake network's bottleneck "
                  "(Zhou et al. 2025)", "mingyuanzhou/SiD branch sida: sida_training/sida_loss.py, "
                  "sida_training_loop.py, run_sida.sh",
                  input_grad=True, drop_nonfinite=True, needs_data=True, needs_discriminator=True,
                  options={"alpha": 1.0, "gan_weight": 1e-4, "disc_weight": 1.0, "gan_start_kimg": 100.0},
                  discriminator_options=("gan_weight", "disc_weight", "gan_start_kimg"),
                  defaults={**_SID_SIGMA, "loss_scale": 100.0}, sigma_init=2.5,
                  check=lambda o: _check_discriminator(o)),
)}


def _check_discriminator(options: dict[str, Any]) -> str | None:
    """A message when the discriminator options of dmd2 / sida are out of range."""
    if options["gan_weight"] < 0 or options["disc_weight"] < 0:
        return f"--gan-weight and --disc-weight must be >= 0 (got {options['gan_weight']}, {options['disc_weight']})"
    if not 0 <= options.get("gan_levels", 0) <= 1000:
        return f"--gan-levels must lie in 0..1000 (got {options['gan_levels']})"
    if options.get("gan_start_kimg", 0) < 0:
        return f"--gan-start-kimg must be >= 0 (got {options['gan_start_kimg']})"
    return None


def loss_option_users() -> dict[str, list[str]]:
    """Every loss option and the losses that take it."""
    users: dict[str, list[str]] = {}
    for spec in GENERATOR_LOSSES.values():
        for option in spec.options:
            users.setdefault(option, []).append(spec.name)
    return users


def get_loss(name: str) -> GeneratorLoss:
    """The registered loss `name`, or ValueError listing the valid names."""
    if name in GENERATOR_LOSSES:
        return GENERATOR_LOSSES[name]
    close = difflib.get_close_matches(name, GENERATOR_LOSSES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(f"unknown loss {name!r}{hint}; choose one of {', '.join(GENERATOR_LOSSES)}")


def add_noise(x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = x + σε (EDM / VE forward process)."""
    return x + _per_sample(sigma, x) * noise


@contextlib.contextmanager
def frozen(*modules: Any) -> Iterator[None]:
    """Weights without gradients while a graph is built through the modules (restored afterwards): the
    generator loss differentiates through the networks' inputs only."""
    params = [p for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def generator_objective(loss: str | GeneratorLoss, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                        teacher: Callable, fake: Callable, labels: torch.Tensor | None = None,
                        parts: dict[str, torch.Tensor] | None = None,
                        discriminator: Callable[[], torch.Tensor] | None = None, **options: Any) -> torch.Tensor:
    """The score part of generator loss `loss` for the batch x (what the loop back-propagates into G):
    x_t = x + σε; D_r, D_f at x_t, with gradients into x through their inputs when the loss asks for it and
    without any otherwise; non-finite samples dropped where the loss says so (the mean still divides by
    the whole batch, as SiD does); then the loss's function. `parts`, when given, receives D_r (a
    discriminator term uses it). `discriminator`, when given, is called right after the fake network's pass on
    x_t and returns the per-sample log p/q there (a discriminator on that pass's features) for a loss that
    weighs by it (uni --divergence fkl|js). The discriminator's options are not the function's."""
    spec = loss if isinstance(loss, GeneratorLoss) else get_loss(loss)
    options = {k: v for k, v in spec.resolve(options).items() if k not in spec.discriminator_options}
    x_t = add_noise(x if spec.input_grad else x.detach(), sigma, noise)
    with frozen(teacher, fake) if spec.input_grad else torch.no_grad():
        d_real = teacher(x_t, sigma, labels).float()
        d_fake = fake(x_t, sigma, labels).float()
        if discriminator is not None and "log_ratio" in spec.tensor_options and options.get("log_ratio") is None:
            options["log_ratio"] = discriminator().detach()
    if parts is not None:
        parts["d_real"] = d_real
    if spec.drop_nonfinite:
        keep = torch.stack([t.detach().flatten(1).isfinite().all(1) for t in (x, d_real, d_fake)]).all(0)
        if not keep.all():
            if x_t.requires_grad:  # the dropped samples' network gradients may be NaN: zero them at x_t
                x_t.register_hook(lambda g: torch.where(_per_sample(keep, g), g, torch.zeros_like(g)))
            for name in spec.tensor_options:
                if options.get(name) is not None:
                    options[name] = options[name][keep]
            kept = spec.fn(x[keep], d_real[keep], d_fake[keep], sigma[keep], **options) if keep.any() \
                else (x * 0).sum()
            return kept * (keep.sum() / keep.numel())
    return spec.fn(x, d_real, d_fake, sigma, **options)


def generator_grad(name: str, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, teacher: Callable,
                   fake: Callable, labels: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
    """∂L/∂x: the gradient that the batch x of generator outputs receives from the score part of loss `name`
    (ikl, dmd, sid, sim, uni) at noise levels σ [N] and noise ε (x's shape), computed by the code the loop
    uses (`generator_objective`). L is the batch mean of per-sample sums, so each row carries a 1/N.
    `teacher` and `fake` are Denoisers; `options` by their CLI names (alpha=1.2, huber_c=..., divergence=...;
    uni with divergence fkl or js also takes log_ratio, a per-sample log p_σ/q_σ at x_t)."""
    x = x.detach().requires_grad_(True)
    loss = generator_objective(name, x, sigma, noise, teacher, fake, labels, **options)
    return torch.autograd.grad(loss, x)[0]


def describe_losses() -> str:
    """One line per loss, for --help."""
    return "; ".join(f"{s.name} = {s.summary}" for s in GENERATOR_LOSSES.values())
