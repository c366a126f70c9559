"""Training with prefill context parallelism: one optimizer step over the global batch.

The loss of a step is the mean next-token cross-entropy over ALL real target tokens of the global
batch (every DP replica's sequences, every PCP rank's chunks):

    loss = (sum over ranks of the local token-loss sums) / (total real target tokens)

Each rank back-propagates its *local sum*; the gradients are summed over the DP x PCP group (every
rank holding the same weights) and divided by the global token count, which is exactly the
gradient of the loss above - what one rank computing the whole batch gets. (Averaging per-rank
means instead would weight a token by ``1 / tokens on its rank``: wrong whenever ranks hold
different numbers of real tokens, e.g. padding of variable-length sequences.)

Collectives per step, in order: TP and PCP ones inside the model (megatron's TP layers, ring
attention, vocab-parallel cross entropy); then ``all_reduce_loss_and_tokens`` (2 numbers) and
``all_reduce_gradients`` (one flat buffer) on the DP x PCP group; ``grad_norm`` (1 number) on the
TP group.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  VocabParallelEmbedding)
from torch.distributed import ProcessGroup
from tqdm.contrib.logging import logging_redirect_tqdm

from cptoolkit.config import Config, ConfigError, TrainConfig
from cptoolkit.layers import comm
from cptoolkit.layers.block_attention import set_backend
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.models.from_config import model_from_config, model_shape
from cptoolkit.models.gpt import CPGPTModel, gpt_forward
from cptoolkit.parallel_state import ParallelGroups
from cptoolkit.progress import progress
from cptoolkit.training.data import TrainBatch, get_batch_on_this_pcp_rank, pack_windows, sample_windows

LOG = logging.getLogger("cptoolkit")
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def lr_at_step(step: int, train: TrainConfig) -> float:
    """Learning rate of 0-based ``step``: linear warmup to ``lr`` over ``warmup_steps`` steps
    (``lr * (step + 1) / warmup_steps``), then cosine decay from ``lr`` to ``min_lr`` at the last step."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(train.steps - 1 - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / decay_steps, 1.0)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (linear and embedding weights) only, not on norms or biases."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr_at_step(0, train), betas=ADAM_BETAS, eps=ADAM_EPS)


def tensor_parallel_params(model: torch.nn.Module) -> set[int]:
    """``id``s of the parameters split over the TP group, from megatron's layer types: column-parallel
    weights and biases, row-parallel weights, vocab-parallel embeddings. Every other parameter (norms,
    row-parallel biases, learned position embeddings) is replicated on every TP rank, its gradient too."""
    sharded = set()
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            sharded.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, RowParallelLinear):
            sharded.add(id(module.weight))
    return sharded


def grad_norm(model: torch.nn.Module, tp_group: ProcessGroup, stats: CommStats | None = None) -> float:
    """Global L2 norm of the model's gradients across its TP shards: squared norms of TP-split
    parameters summed over ``tp_group`` (one all-reduce), replicated parameters counted once (on TP
    rank 0). Gradients must already be identical across the DP x PCP group."""
    sharded = tensor_parallel_params(model)
    count_replicated = tp_group.rank() == 0
    squares = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for param in model.parameters():
        if id(param) in sharded or count_replicated:
            squares += param.grad.double().square().sum()
    return math.sqrt(float(comm.all_reduce(squares, tp_group, stats=stats)))


def clip_gradients(model: torch.nn.Module, max_norm: float, tp_group: ProcessGroup,
                   stats: CommStats | None = None) -> float:
    """Scale all gradients by ``max_norm / norm`` when the global norm exceeds ``max_norm``; returns
    the norm before clipping."""
    norm = grad_norm(model, tp_group, stats)
    if norm > max_norm:
        for param in model.parameters():
            param.grad.mul_(max_norm / norm)
    return norm


def all_reduce_gradients(model: torch.nn.Module, dp_pcp_group: ProcessGroup,
                         stats: CommStats | None = None) -> None:
    """Sum every gradient over ``dp_pcp_group`` (all holders of the same weight shards) with one
    all-reduce of one flat buffer."""
    grads = [param.grad for param in model.parameters()]
    flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), dp_pcp_group, stats=stats)
    for grad, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(reduced.view_as(grad))


def all_reduce_loss_and_tokens(local_loss_sum: torch.Tensor, local_num_tokens: int,
                               dp_pcp_group: ProcessGroup, stats: CommStats | None = None) -> tuple[float, int]:
    """``(global token-loss sum, global real-token count)`` summed over ``dp_pcp_group``. TP ranks need
    no reduction: vocab-parallel cross entropy gives every TP rank the full per-token loss."""
    totals = torch.tensor([float(local_loss_sum), float(local_num_tokens)], dtype=torch.float64,
                          device=local_loss_sum.device)
    comm.all_reduce(totals, dp_pcp_group, stats=stats)
    return float(totals[0]), int(totals[1])


def compute_gradients(model: CPGPTModel, runtime: AttentionRuntime, batch: TrainBatch,
                      groups: ParallelGroups, stats: CommStats | None = None) -> tuple[float, int]:
    """Forward and backward of this rank's ``batch``; leaves in every ``param.grad`` the gradient of
    the global mean token loss (identical on every rank of the DP x PCP group). Returns
    ``(global mean loss, global real-token count)``."""
    model.zero_grad(set_to_none=True)
    token_loss = gpt_forward(model, batch.input_ids, batch.position_ids, runtime, labels=batch.labels)
    local_loss_sum = torch.where(batch.loss_mask, token_loss, 0.0).sum()
    local_loss_sum.backward()
    loss_sum, num_tokens = all_reduce_loss_and_tokens(local_loss_sum.detach(), batch.num_loss_tokens,
                                                      groups.dp_pcp_group, stats)
    if num_tokens == 0:
        raise ValueError("the global batch has no target token with loss_mask set: nothing to train on")
    all_reduce_gradients(model, groups.dp_pcp_group, stats)
    for param in model.parameters():
        param.grad.div_(num_tokens)
    return loss_sum / num_tokens, num_tokens


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step: ``step`` is 1-based; ``loss`` is the global mean token loss before the
    update; ``grad_norm`` is before clipping; ``tokens_per_s`` counts the global batch's real tokens."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    num_tokens: int
    tokens_per_s: float


@dataclass
class Trainer:
    """Model, optimizer and data of one rank; ``step()`` runs one optimizer step of the global batch.

    ``documents`` are the tokenized corpus (every rank holds all of it and draws the same global batch
    per step); this rank trains the windows of its DP rank, sharded for its PCP rank. ``runtime.stats``
    counts the attention layers' collectives and the trainer's three all-reduces per step (megatron's
    TP layers and the vocab-parallel cross entropy call ``torch.distributed`` directly, uncounted).
    """

    cfg: Config
    groups: ParallelGroups
    model: CPGPTModel
    runtime: AttentionRuntime
    documents: list[torch.Tensor]
    pad_id: int
    device: torch.device
    optimizer: torch.optim.AdamW = field(init=False)
    steps_done: int = field(init=False, default=0)

    def __post_init__(self):
        self.optimizer = build_optimizer(self.model, self.cfg.train)

    def batch(self, step: int) -> TrainBatch:
        """This rank's share of the global batch of 0-based ``step``."""
        train, info = self.cfg.train, self.groups.rank_info
        windows = sample_windows(self.documents, step, self.groups.layout.dp * train.micro_batch_size,
                                 train.seq_len, train.seed)
        mine = windows[info.dp_rank * train.micro_batch_size:(info.dp_rank + 1) * train.micro_batch_size]
        return get_batch_on_this_pcp_rank(pack_windows(mine), info.pcp_rank, self.groups.pcp_size,
                                          self.pad_id).to(self.device)

    def step(self) -> StepMetrics:
        start = time.perf_counter()
        step, train = self.steps_done, self.cfg.train
        stats = self.runtime.stats
        loss, num_tokens = compute_gradients(self.model, self.runtime, self.batch(step), self.groups, stats)
        norm = clip_gradients(self.model, train.grad_clip, self.groups.tp_group, stats)
        lr = lr_at_step(step, train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.steps_done += 1
        return StepMetrics(step=step + 1, loss=loss, lr=lr, grad_norm=norm, num_tokens=num_tokens,
                           tokens_per_s=num_tokens / (time.perf_counter() - start))

    def run(self) -> list[StepMetrics]:
        """All ``train.steps`` steps; logs a progress line about 20 times per run, and for the first
        and last step (INFO: rank 0 under ``run_main``). A progress bar of the steps, the loss in its postfix
        (``cptoolkit.progress``: rank 0, on a terminal); log lines are written above it, not through it."""
        history = []
        steps = self.cfg.train.steps
        log_every = max(1, steps // 20)
        with progress(steps, "training", "step") as bar, logging_redirect_tqdm():
            for _ in range(steps):
                metrics = self.step()
                history.append(metrics)
                bar.set_postfix(loss=f"{metrics.loss:.4f}", refresh=False)
                bar.update()
                if metrics.step % log_every == 0 or metrics.step in (1, steps):
                    LOG.info("step %d/%d | loss %.4f | lr %.3e | grad_norm %.3f | %d tokens | %.0f tokens/s",
                             metrics.step, steps, metrics.loss, metrics.lr, metrics.grad_norm,
                             metrics.num_tokens, metrics.tokens_per_s)
        return history


def validate_train_config(cfg: Config, tokenizer_vocab_size: int) -> None:
    """Training's rules beyond ``load_config``'s (which already checks seq_len, TP divisibility and the
    KV heads training needs), checked before any process group exists: a ``train`` section, a model
    shape that builds (``GPTShape``) and a vocabulary that holds the tokenizer's ids.

    Raises ``ConfigError`` naming the config file, the field, its value and the rule.
    """
    if cfg.train is None:
        raise ConfigError(f"{cfg.source}: launch/train.py needs a 'train' section (this is an inference config)")
    if cfg.model.vocab_size < tokenizer_vocab_size:
        raise ConfigError(f"{cfg.source}: model.vocab_size = {cfg.model.vocab_size!r}: must be >= the "
                          f"tokenizer's vocabulary ({tokenizer_vocab_size} ids)")
    try:
        model_shape(cfg)
    except ValueError as err:
        raise ConfigError(f"{cfg.source}: model: {err}") from None


def build_trainer(cfg: Config, groups: ParallelGroups, documents: list[torch.Tensor], pad_id: int,
                  device: torch.device) -> Trainer:
    """Model with prefill attention over the PCP group, sharded over the TP group, on ``device``
    (weights from ``model.checkpoint``, else seeded random from ``model.seed``); the optimizer; this
    rank's data."""
    runtime = AttentionRuntime(pcp_group=groups.pcp_group, prefill_comm=cfg.parallel.prefill_comm,
                               hcp_groups=groups.hcp_groups, stats=CommStats())
    set_backend(cfg.runtime.attention_backend)  # the block kernels' backend (te also picks megatron's TE spec)
    model = model_from_config(cfg, groups, runtime)
    return Trainer(cfg=cfg, groups=groups, model=model.to(device).train(), runtime=runtime,
                   documents=documents, pad_id=pad_id, device=device)
