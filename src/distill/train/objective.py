"""The training objective, resolved once from the config: the one place where targets meet the loss.

`Objective.from_config` decides everything that does not change from step to step: the divergence
and its keyword arguments (``generalized_jsd`` with ``beta`` for on-policy, ``cfg.loss`` otherwise),
the weight of the distillation term (``alpha``; 1 on on-policy batches), the distillation temperature
(with its T² factor) and the temperature the store's log-probabilities were captured at, and how many
vocabulary entries the two distributions share. The loop then calls `Objective.loss_sum` per micro-batch.

Targets, whatever their source, are turned into what `distill.losses` takes here and nowhere else:
a local teacher's logits (dense), or the batch's ``topk_ids``/``topk_logprobs`` (a store's top-k, or
any other producer of targets in the student's vocabulary) as `SparseTargets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distill.losses import SparseTargets, kd_loss, uld_topk
from distill.train.config import TrainConfig
from distill.train.examples import IGNORE


@dataclass(frozen=True)
class Objective:
    """Per-token objective of a training run: ``alpha * T² * KD + (1 - alpha) * CE`` (``sft``: CE alone)."""

    mode: str
    """``sft``, ``logits`` or ``on-policy`` (as `TrainConfig.mode`)."""
    loss: str
    """Divergence in `distill.losses.LOSSES`: ``generalized_jsd`` for on-policy, else the config's."""
    loss_kwargs: dict[str, float] = field(default_factory=dict)
    """Keyword arguments of the divergence (``beta`` for ``generalized_jsd``)."""
    alpha: float = 0.5
    """Weight of the distillation term on data batches; on-policy batches use 1 (GKD)."""
    temperature: float = 1.0
    """Distillation temperature T of both distributions; the term is multiplied by T²."""
    capture_temperature: float = 1.0
    """Temperature the batch's top-k log-probabilities were captured at (a store's manifest)."""
    n_vocab: int | None = None
    """Vocabulary entries both models share; logits beyond them (padding rows) are left out of both
    distributions and of CE. ``None``: the student's whole head (``sft``)."""
    fused: bool = False
    """Compute the loss from hidden states, the head applied a chunk of rows at a time
    (`distill.train.heads`); ``False``: from the model's full logits (this class's `loss_sum`)."""
    chunk_size: int | None = None
    """Rows per chunk of the fused loss; ``None``: `distill.train.heads.default_chunk_size`."""
    teacher_top_k: int = 0
    """A local teacher's top-k (+ tail bucket) instead of its full distribution; 0: full."""
    cross_tokenizer: str = "project"
    """Batches from a teacher of another tokenizer (they carry ``kd_mask``): ``project`` (their top-k is
    already in the student's vocabulary: ``loss`` applies) or ``uld`` (`distill.losses.uld_topk` against
    the teacher's own sorted top-k, ``uld_logprobs``)."""

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, capture_temperature: float = 1.0, n_vocab: int) -> Objective:
        """The objective ``cfg`` asks for; ``n_vocab``: real entries of the student's tokenizer (shared with
        the teacher's), ``capture_temperature``: the store's (1 for a table or a local teacher)."""
        name = "generalized_jsd" if cfg.mode == "on-policy" else cfg.loss
        return cls(
            mode=cfg.mode,
            loss=name,
            loss_kwargs={"beta": cfg.beta} if name == "generalized_jsd" else {},
            alpha=cfg.alpha,
            temperature=cfg.temperature,
            capture_temperature=capture_temperature,
            n_vocab=None if cfg.mode == "sft" else n_vocab,
            # ULD reads the teacher's own sorted top-k (uld_logprobs), which the fused head does not:
            # ULD runs on the full logits (its students are small-vocabulary ones here; docs/losses.md).
            fused=cfg.fused and cfg.cross_tokenizer != "uld",
            chunk_size=cfg.chunk_size,
            teacher_top_k=cfg.teacher_top_k,
            cross_tokenizer=cfg.cross_tokenizer,
        )

    @property
    def distills(self) -> bool:
        """Whether there is a distillation term (every mode but ``sft``)."""
        return self.mode != "sft"

    def kd_weight(self, on_policy: bool) -> float:
        """Weight of the distillation term: the student's own samples are not CE targets, so on-policy
        batches are pure divergence (as in GKD); data batches use ``alpha``."""
        return 1.0 if on_policy else self.alpha

    def targets(self, batch: dict[str, torch.Tensor], teacher_logits: torch.Tensor | None):
        """The teacher signal for shifted positions ``[:, 1:]``: a local teacher's logits ``(B, L-1, V)``,
        else the batch's top-k as `SparseTargets` ``(B, L-1, K)``."""
        if teacher_logits is not None and self.teacher_top_k:
            return SparseTargets.from_logits(teacher_logits, self.teacher_top_k, temperature=self.temperature)
        if teacher_logits is not None:
            return teacher_logits
        return SparseTargets(
            batch["topk_ids"][:, 1:], batch["topk_logprobs"][:, 1:], temperature=self.capture_temperature
        )

    def _kd_sum(self, s_logits: torch.Tensor, batch, t_logits, mask: torch.Tensor) -> torch.Tensor:
        """Sum over counted positions of the distillation term. ``s_logits``: (B, L-1, V) shifted.

        Multiplied by T² (Hinton et al.): the soft term's gradients scale as 1/T², and T² keeps its
        weight against the CE term when T changes. At T = 1 (GKD's setting) the factor is 1.
        """
        n = int(mask.sum())
        if n == 0:
            return s_logits.sum() * 0.0
        if t_logits is None and self.cross_tokenizer == "uld" and "uld_logprobs" in batch:
            mean = uld_topk(s_logits, batch["uld_logprobs"][:, 1:], temperature=self.temperature,
                            capture_temperature=self.capture_temperature, mask=mask)  # fmt: skip
            return mean * n * self.temperature**2
        teacher = self.targets(batch, t_logits)
        mean = kd_loss(
            s_logits, teacher, loss=self.loss, temperature=self.temperature, mask=mask, **self.loss_kwargs
        )
        return mean * n * self.temperature**2

    def loss_sum(
        self,
        s_logits: torch.Tensor,
        batch: dict[str, torch.Tensor],
        t_logits: torch.Tensor | None,
        *,
        on_policy: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the per-token objective over the micro-batch, parts for logging). Logits: (B, L, V)."""
        s = s_logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        if "kd_mask" in batch:  # rows whose KD is masked out (unaligned positions): CE only
            mask = mask & batch["kd_mask"][:, 1:].bool()
        t = None if t_logits is None else t_logits[:, :-1]
        if self.n_vocab is not None:
            s = s[..., : self.n_vocab]
            t = None if t is None else t[..., : self.n_vocab]
        ce = F.cross_entropy(
            s.float().reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        if not self.distills:
            return ce, {"ce": ce.detach()}
        # Across tokenizers only aligned positions have a teacher distribution; the others get CE only.
        kd_mask = mask & batch["kd_mask"][:, 1:] if "kd_mask" in batch and t is None else mask
        kd = self._kd_sum(s, batch, t, kd_mask)
        alpha = self.kd_weight(on_policy)
        return alpha * kd + (1 - alpha) * ce, {"ce": ce.detach(), "kd": kd.detach()}


__all__ = ["Objective"]
