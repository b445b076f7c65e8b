"""CAP — Cross-image Anti-Personalization (Wang et al. 2025, seed paper 002): a plug-in on a host method.

protect.md §8. CAP keeps everything of its host (ASPL, FSMG or SimAC: surrogates, schedule, loss) and
changes the PGD step from step k̂ = K/2 on (K = the host's total PGD steps). With L_re the host's loss
summed over the set and L_cons the spread of the images' VGG-19 Gram matrices around their mean,

    g_re = ∇L_re,  g_c = ∇L_cons
    for r in 0..R:  x_r = proj(x + α·sign(g_re + s·r·g_c)),  ℓ_r = L_re(x_r)   (the step's own t, ε)
    x ← x_λ,  λ = argmax_r ℓ_r   (first maximum, as Alg. 1's strict comparison picks)

s = −1 by default (§4.3: minimising L_cons makes the styles uniform) [PROP]; s = +1 is Alg. 1 read literally.
Candidates whose sign pattern equals the previous candidate's are the same point and are not re-evaluated.
The candidates are evaluated ``cap_batch`` at a time in one UNet pass (stacked along the batch, each on the
step's own draw; the hosts' losses come back per candidate), not in R + 1 separate passes.

CAP is group-level: the result for an image depends on the whole set. It must not depend on the order in
which the files were listed, so the host runs on the set in a canonical order — sorted by the sha256 of each
image's 8-bit pixels — and the results are put back in the input order. That one permutation covers every
order-dependent piece of every host at once: the per-step draws from the run's generator, ASPL's surrogate
training on images 0..n−1 [Q], and the summation order of the mean Gram matrix, so permuting the input names
gives byte-identical outputs per file. (Per-image random streams alone would not: the hosts' surrogates pick
images by index.)
"""

from __future__ import annotations

import hashlib
import types
from dataclasses import replace
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import torch
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from cloak.adversarial import pgd_step
from cloak.adversarial.groups import Groups
from cloak.errors import UsageError
from cloak.io.images import ImageSet
from cloak.protect.aspl import Aspl
from cloak.protect.base import BudgetOptions, ProtectMethod, ProtectResult
from cloak.protect.fsmg import Fsmg
from cloak.protect.simac import Simac

HOSTS: dict[str, type[Aspl]] = {"aspl": Aspl, "fsmg": Fsmg, "simac": Simac}
STYLE_LAYERS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1")  # "first five conv layers" [P] → [PROP]


# --- the consistency loss ----------------------------------------------------------------------------------
def gram_matrices(features: list[torch.Tensor], normalise: bool = True) -> list[torch.Tensor]:
    """``G = F Fᵀ`` per layer (B×C×C) from B×C×H×W activations; divided by C·H·W when ``normalise`` [PROP]."""
    grams = []
    for f in features:
        b, c, h, w = f.shape
        flat = f.float().reshape(b, c, h * w)
        g = flat @ flat.transpose(1, 2)
        grams.append(g / (c * h * w) if normalise else g)
    return grams


def style_distances(grams: list[torch.Tensor]) -> torch.Tensor:
    """Per image, Σ_l ‖G_l(x_i) − Ḡ_l‖²_F with Ḡ_l the set's mean Gram matrix (B,)."""
    return torch.stack([(g - g.mean(0, keepdim=True)).pow(2).flatten(1).sum(1) for g in grams]).sum(0)


def consistency_loss(grams: list[torch.Tensor]) -> torch.Tensor:
    """L_cons = (1/N) Σ_i Σ_l ‖G_l(x_i) − Ḡ_l‖²_F (CAP Eq. 15, summed over the style layers)."""
    return style_distances(grams).mean()


class StyleConsistency:
    """L_cons of a set of [-1, 1] images through VGG-19 features (frozen).

    A set of several shapes (``Groups``) goes through VGG bucket by bucket; a Gram matrix is C×C whatever
    the image size (and divided by C·H·W when normalised, so images of different sizes are comparable), so
    the set's mean Gram matrix and every image's distance to it are taken over the whole set, as for a
    uniform set: the buckets' Gram matrices are concatenated (bucket order) before the mean."""

    def __init__(self, features, normalise: bool = True):
        self.features = features
        self.normalise = normalise

    def grams(self, x: torch.Tensor | Groups) -> list[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            return gram_matrices(self.features(x.float()), self.normalise)
        per_bucket = [self.grams(part) for part in x.parts]
        return [torch.cat(layer) for layer in zip(*per_bucket)]

    def __call__(self, x: torch.Tensor | Groups) -> torch.Tensor:
        return consistency_loss(self.grams(x))

    @torch.no_grad()
    def distances(self, x: torch.Tensor | Groups) -> torch.Tensor:
        """Per image (in set order) Σ_l ‖G_l(x_i) − Ḡ_l‖²_F."""
        d = style_distances(self.grams(x))
        if isinstance(x, torch.Tensor):
            return d
        order = [i for idx in x.indices for i in idx]
        out = torch.empty_like(d)
        out[order] = d
        return out


# --- options: CAP's own, plus every host's -------------------------------------------------------------------
class _CapOwn(BudgetOptions):
    """CAP's knobs; eps/alpha are CAP §5's (the same for every host) and are handed to the host."""

    host: Literal["aspl", "fsmg", "simac"] = Field("aspl", description="host method whose PGD step CAP augments")
    start_fraction: float = Field(0.5, ge=0, le=1, description="CAP acts from PGD step k̂ = start_fraction·K "
                                                               "(K = the host's total PGD steps)")
    ratio_max: int = Field(100, ge=0, description="R: the ratio λ is searched over the integers 0..R each step")
    cap_sign: int = Field(-1, description="s: −1 makes the styles uniform (§4.3), +1 is Alg. 1 read literally")
    cap_batch: int = Field(8, ge=0, description="line-search candidates per UNet pass (each with the whole set, "
                                                "or its pgd_batch chunk); 0 = all of a step's at once, 1 = one "
                                                "pass per candidate. Same draws, same choice")
    style_layers: list[str] = Field(list(STYLE_LAYERS), description="VGG-19 layers of the Gram matrices "
                                                                   "(post-ReLU)")
    gram_normalise: bool = Field(True, description="divide each Gram matrix by C·H·W (Gatys)")
    style_model: str = Field("vgg19-imagenet", description="catalog id of the VGG-19 weights")

    @field_validator("cap_sign")
    @classmethod
    def _sign(cls, value: int) -> int:
        if value not in (-1, 1):
            raise ValueError("cap_sign must be -1 or +1")
        return value

    @model_validator(mode="before")
    @classmethod
    def _comma_lists(cls, data: Any) -> Any:
        """``-o style_layers=conv1_1,conv2_1`` (and the hosts' list options) arrive as one string."""
        if isinstance(data, dict):
            for key, value in list(data.items()):
                field = cls.model_fields.get(key)
                if isinstance(value, str) and field is not None and _is_list(field.annotation):
                    data[key] = [v.strip() for v in value.split(",") if v.strip()]
        return data


def _is_list(annotation) -> bool:
    if get_origin(annotation) is list:
        return True
    return get_origin(annotation) in (Union, types.UnionType) and any(get_origin(a) is list
                                                                      for a in get_args(annotation))


def _options_model() -> type[_CapOwn]:
    """CAP's options plus the union of the hosts' (other than the budget, which CAP sets).

    An option whose default differs between hosts defaults to None here, meaning "the host's default".
    """
    own = set(_CapOwn.model_fields)
    names: list[str] = []
    for cls in HOSTS.values():
        names += [n for n in cls.Options.model_fields if n not in own and n not in names]
    fields: dict[str, Any] = {}
    for name in names:
        having = {h: cls.Options.model_fields[name] for h, cls in HOSTS.items() if name in cls.Options.model_fields}
        first = next(iter(having.values()))
        applies = "" if len(having) == len(HOSTS) else f" [host: {', '.join(having)}]"
        extra = first.json_schema_extra if isinstance(first.json_schema_extra, dict) else None
        if all(repr(f.default) == repr(first.default) for f in having.values()):
            fields[name] = (first.annotation, Field(first.default, description=(first.description or "") + applies,
                                                    json_schema_extra=extra))
        else:
            per_host = ", ".join(f"{h} {f.default!r}" for h, f in having.items())
            fields[name] = (first.annotation | None, Field(
                None, description=f"{first.description or ''} (default: the host's — {per_host}){applies}",
                json_schema_extra=extra))
    return create_model("CapOptions", __base__=_CapOwn, **fields)


CapOptions = _options_model()


# --- the plug-in ---------------------------------------------------------------------------------------------
class CapPlugin:
    """Mixed in front of a host class: overrides ``update`` (the host's PGD step) from step k̂ on."""

    cap_state: dict

    def cap_setup(self, style: StyleConsistency, *, ratio_max: int, sign: int, start_fraction: float,
                  batch: int = 1) -> None:
        total = self.total_pgd_steps()
        self.cap_state = {"style": style, "R": ratio_max, "s": sign, "K": total, "k_hat": start_fraction * total,
                          "batch": batch, "lambdas": [], "evaluated": 0, "per_step": [], "passes": 0,
                          "consistency": [], "step_loss": []}

    def candidates(self, x: Groups, x0: Groups, g_re: Groups, g_c: Groups, eps: float, alpha: float):
        """(r, x_r) for r = 0..R, skipping a candidate whose sign pattern equals the previous one's (the same
        point: the same loss, never a strict improvement). Made lazily, so a pass holds only its own."""
        st = self.cap_state
        previous = None
        for r in range(st["R"] + 1):
            direction = g_re.map(lambda a, c: (a + (st["s"] * r) * c).sign(), g_c)
            if previous is not None and direction.equal(previous):
                continue
            previous = direction
            yield r, x.map(lambda p, d, p0: pgd_step(p, d, p0, alpha, eps), direction, x0)

    def candidate_losses(self, x, x0, g_re, g_c, eps: float, alpha: float, loss_fn):
        """(r, x_r, L(x_r)) in r order: ``cap_batch`` candidates per loss evaluation (0 = all at once; 1 = one
        evaluation each, the plain ``loss_value``). Every candidate sees the step's own draw either way."""
        st = self.cap_state
        size = st["batch"] if st["batch"] > 0 else st["R"] + 1

        def counted(*args, **kwargs):  # each call of the step's loss is one UNet pass over its pixels
            st["passes"] += 1
            return loss_fn(*args, **kwargs)

        pending: list = []
        for item in self.candidates(x, x0, g_re, g_c, eps, alpha):
            pending.append(item)
            if len(pending) < size:
                continue
            yield from self._evaluate(pending, counted)
            pending = []
        if pending:
            yield from self._evaluate(pending, counted)

    def _evaluate(self, pending: list, loss_fn):
        if self.cap_state["batch"] == 1:
            values = [self.loss_value(candidate, loss_fn) for _, candidate in pending]
        else:
            values = self.candidate_values([candidate for _, candidate in pending], loss_fn)
        self.cap_state["evaluated"] += len(pending)
        for (r, candidate), value in zip(pending, values):
            yield r, candidate, value

    def update(self, x, x0, loss_fn, eps: float, alpha: float):
        st = self.cap_state
        k = self.pgd_steps_done + 1  # Alg. 1 counts steps from 1
        if k < st["k_hat"]:
            return super().update(x, x0, loss_fn, eps, alpha)
        n = len(x)
        loss, grad = self.loss_and_grad(x, loss_fn)
        # The hosts return the batch mean; Alg. 1's L_re is the sum over the set. Scaling after the
        # backward pass keeps r = 0 bit-identical to the host's own step.
        g_re = grad.map(lambda g: g * n)
        xc = x.map(lambda p: p.detach().requires_grad_(True))
        cons = st["style"](xc)
        g_c = Groups(list(torch.autograd.grad(cons, xc.parts)), x.indices)
        x = x.detach()
        best_value, best_x, best_r, host_value = None, None, 0, None
        evaluated = st["evaluated"]
        with torch.no_grad():
            for r, candidate, value in self.candidate_losses(x, x0, g_re, g_c, eps, alpha, loss_fn):
                value = value * n
                if host_value is None:
                    host_value = value  # r = 0: where the host's own step lands
                if best_value is None or value > best_value:
                    best_value, best_x, best_r = value, candidate, r
        st["lambdas"].append(best_r)
        st["per_step"].append(st["evaluated"] - evaluated)
        st["consistency"].append(float(cons.detach()))
        # L_re after the step on the step's own draw: the chosen candidate vs the host's own step (r = 0).
        st["step_loss"].append((best_value, host_value))
        return best_x, loss

    # A checkpoint of the host's loop also keeps CAP's record of the steps taken so far.
    def loop_state(self) -> dict[str, Any]:
        st = self.cap_state
        return {**super().loop_state(), "cap": {k: st[k] for k in ("lambdas", "evaluated", "per_step",
                                                                    "passes", "consistency", "step_loss")}}

    def restore_loop(self, loop: dict[str, Any]) -> None:
        super().restore_loop(loop)
        self.cap_state.update({k: v for k, v in loop["cap"].items()})
        self.cap_state["step_loss"] = [tuple(v) for v in self.cap_state["step_loss"]]


def _reorder(pixels, order: list[int]):
    """A set's pixels (B×3×H×W tensor or per-image list) in the given order."""
    return pixels[order] if isinstance(pixels, torch.Tensor) else [pixels[i] for i in order]


def _plugged(host_cls: type[Aspl]) -> type:
    return type(f"Cap{host_cls.__name__}", (CapPlugin, host_cls), {})


def canonical_order(images: ImageSet) -> list[int]:
    """Indices of the set sorted by the sha256 of each image's 8-bit pixels (name breaks exact ties)."""
    digests = [hashlib.sha256(((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                              .contiguous().numpy().tobytes()).hexdigest() for t in images.tensors]
    return sorted(range(len(images)), key=lambda i: (digests[i], images.items[i].name))


class Cap(ProtectMethod):
    paper = "Wang et al., Privacy Protection Against Personalized Text-to-Image Synthesis via Cross-image " \
            "Consistency Constraints, 2025 (CAP; seed paper 002)"
    implements = ("CAP Alg. 1 as a plug-in on the host's PGD step: VGG-19 Gram-matrix consistency from k̂ = K/2 "
                  "with the dynamic ratio line search over r ∈ {0..R}; no released code")
    notes: ClassVar[str] = (
        "Host options pass through (-o iterations=..., -o steps=... for fsmg; --steps is not taken, the host's "
        "count has a host-specific name); the budget is CAP's (α 0.005, "
        "η 0.05, all hosts). The host runs on the set sorted by pixel sha256 so the file order cannot change "
        "the result. Sign s = −1 by default (§4.3 text) where Alg. 1 reads +1 [PROP]; the line search evaluates "
        "every r on the step's own (t, ε) [PROP], cap_batch candidates per UNet pass (same draws, same λ).")
    Options = CapOptions
    proposals: ClassVar[tuple[str, ...]] = ("host", "cap_sign", "style_layers", "gram_normalise")
    uses_ref = True
    steps_option = None  # the host's main count has a host-specific name (iterations / steps)
    default_model = "sd21-base"
    tiny_options: ClassVar[dict] = {"class_images": 2, "iterations": 2, "surrogate_steps": 1, "pgd_steps": 2,
                                    "ratio_max": 3}

    def host_options(self):
        """The host's Options from CAP's: CAP's budget, every option the host knows, nothing it does not."""
        o = self.opts
        host_cls = HOSTS[o.host]
        host_fields = host_cls.Options.model_fields
        own = set(_CapOwn.model_fields)
        stray = sorted(n for n in o.model_fields_set if n not in own and n not in host_fields)
        if stray:
            raise UsageError(f"cap: option(s) {', '.join(stray)} do not apply to host {o.host}",
                             hint=f"`cloak methods show {o.host}` lists the host's options")
        kwargs: dict[str, Any] = {"eps": o.eps, "alpha": o.alpha, "unit": o.unit}
        for name in type(o).model_fields:
            if name in own or name not in host_fields:
                continue
            value = getattr(o, name)
            if value is None and host_fields[name].default is not None:
                continue  # None = the host's own default
            kwargs[name] = value
        try:
            return host_cls.Options(**kwargs)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise UsageError(f"cap (host {o.host}): invalid option value: {problems}") from None

    def __call__(self, images: ImageSet) -> ProtectResult:
        from cloak.models.encoders import load_vgg_features

        ctx, o = self.ctx, self.opts
        host = _plugged(HOSTS[o.host])(self.host_options(), ctx)
        host.name = f"cap+{o.host}"
        host.identity_extra = {"cap": o.model_dump(mode="json")}
        features = load_vgg_features(ctx.models, tuple(o.style_layers), o.style_model)
        style = StyleConsistency(features, o.gram_normalise)
        host.cap_setup(style, ratio_max=o.ratio_max, sign=o.cap_sign, start_fraction=o.start_fraction,
                       batch=o.cap_batch)

        order = canonical_order(images)
        inverse = [0] * len(order)
        for position, index in enumerate(order):
            inverse[index] = position
        if ctx.snapshot is not None:  # the host sees the canonical order; the writer wants the input order
            host.ctx = replace(ctx, snapshot=lambda label, x, write=ctx.snapshot: write(label, _reorder(x, inverse)))
        result = host(images.subset(order))
        pixels = _reorder(result.pixels, inverse)
        records = [dict(result.records[p]) if p < len(result.records) else {} for p in inverse]

        first = pixels if isinstance(pixels, torch.Tensor) else pixels[0]
        x0 = Groups.of(images, first.device, first.dtype)
        clean_dist, final_dist = style.distances(x0), style.distances(Groups.from_list(pixels))
        for rec, before, after in zip(records, clean_dist.tolist(), final_dist.tolist()):
            rec.update({"style_distance_clean": before, "style_distance": after})
        st = host.cap_state
        lambdas = st["lambdas"]
        summary = {**result.summary, "cap": {
            "host": o.host, "total_pgd_steps": st["K"], "k_hat": st["k_hat"], "cap_steps": len(lambdas),
            "ratio_max": st["R"], "sign": st["s"], "style_layers": list(o.style_layers),
            "lambda_mean": sum(lambdas) / len(lambdas) if lambdas else None, "lambdas": lambdas,
            "candidates_evaluated": st["evaluated"], "candidates_per_step": st["per_step"],
            "cap_batch": st["batch"],
            "candidate_loss_passes": st["passes"],
            "step_loss_chosen": [round(a, 6) for a, _ in st["step_loss"]],
            "step_loss_host_step": [round(b, 6) for _, b in st["step_loss"]],
            "consistency_clean": float(clean_dist.mean()), "consistency_final": float(final_dist.mean()),
            "canonical_order": [images.items[i].name for i in order]}}
        return ProtectResult(pixels, records, summary)
