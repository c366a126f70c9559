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
TP group. An MoE model adds its layers' dispatch collectives (``cptoolkit.moe.layer``), the step's expert load
(``moe_balance``: one all-reduce over TP, one over DP x PCP; two more report the auxiliary loss when it is on),
the routers' gradients over TP and the experts' over DP (``all_reduce_gradients``) and the experts' squared
norm over the replica (``grad_norm``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch.distributed import ProcessGroup
from tqdm.contrib.logging import logging_redirect_tqdm

from cptoolkit.config import Config, ConfigError, TrainConfig
from cptoolkit.layers import comm
from cptoolkit.layers.block_attention import set_backend
from cptoolkit.layers.comm import CommStats
from cptoolkit.layers.core_attention import AttentionRuntime
from cptoolkit.models.from_config import model_from_config, model_shape
from cptoolkit.models.gpt import CPGPTModel, gpt_forward
from cptoolkit.models.tp_sharding import ExpertRows, Replicated, param_kinds
from cptoolkit.moe.layer import LocalExperts, Router, moe_layers
from cptoolkit.parallel_state import ParallelGroups
from cptoolkit.progress import progress
from cptoolkit.training.moe_balance import global_expert_load, load_balancing_loss, update_expert_bias
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
    """``id``s of the parameters split over the TP group, by their TP kinds (``tp_sharding.param_kinds``):
    column- and row-parallel weights, fused QKV, vocab-parallel rows, the shared experts' slices. Replicated
    ones (norms, row-parallel biases, routers, learned position embeddings) are whole on every TP rank, their
    gradients too; routed experts are placed by EP and ETP, not TP (``expert_params``)."""
    params = dict(model.named_parameters())
    return {id(params[name]) for name, kind in param_kinds(model).items()
            if not isinstance(kind, (Replicated, ExpertRows))}


def expert_params(model: torch.nn.Module) -> set[int]:
    """``id``s of the routed experts' parameters: each replica holds each slice once (EP x ETP), so their
    gradients are summed over DP only and their norms over the replica."""
    return {id(p) for module in model.modules() if isinstance(module, LocalExperts) for p in module.parameters()}


def etp_replicated_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Expert parameters whole on every rank of their ETP group (gpt-oss's down-projection biases): only its first
    rank adds them (``LocalExperts``), so only its gradient is non-zero until summed over the ETP group."""
    return [module.fc2_bias for module in model.modules()
            if isinstance(module, LocalExperts) and module.fc2_bias is not None]


def router_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The routers' trained parameters: whole on every rank, but each TP rank routes only its share of the
    prefill rows (``MoELayer``), so their gradients are partial sums over TP too."""
    return [p for module in model.modules() if isinstance(module, Router)
            for p in module.parameters() if p.requires_grad]


def trained_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters gradients train (not DeepSeek-V3's score-correction bias, set by ``update_expert_bias``)."""
    return [p for p in model.parameters() if p.requires_grad]


def grad_norm(model: torch.nn.Module, groups: ParallelGroups, stats: CommStats | None = None) -> float:
    """Global L2 norm of the model's gradients across its shards: squared norms of TP-split parameters summed
    over the TP group, replicated parameters counted once (on TP rank 0), one all-reduce; with routed experts,
    their squares summed over the replica (each slice once), one more. Gradients must already be reduced
    (identical across the DP x PCP group)."""
    sharded, experts = tensor_parallel_params(model), expert_params(model)
    count_replicated = groups.tp_group.rank() == 0
    # an ETP-replicated expert parameter once per replica: on its ETP group's first rank
    etp_copies = set() if groups.etp_rank == 0 else {id(p) for p in etp_replicated_params(model)}
    device = next(model.parameters()).device
    squares = torch.zeros((), dtype=torch.float64, device=device)
    expert_squares = torch.zeros((), dtype=torch.float64, device=device)
    for param in trained_params(model):
        if id(param) in etp_copies:
            continue
        if id(param) in experts:
            expert_squares += param.grad.double().square().sum()
        elif id(param) in sharded or count_replicated:
            squares += param.grad.double().square().sum()
    total = comm.all_reduce(squares, groups.tp_group, stats=stats)
    if experts:
        total = total + comm.all_reduce(expert_squares, groups.replica_group, stats=stats)
    return math.sqrt(float(total))


def clip_gradients(model: torch.nn.Module, max_norm: float, groups: ParallelGroups,
                   stats: CommStats | None = None) -> float:
    """Scale all gradients by ``max_norm / norm`` when the global norm exceeds ``max_norm``; returns
    the norm before clipping."""
    norm = grad_norm(model, groups, stats)
    if norm > max_norm:
        for param in trained_params(model):
            param.grad.mul_(max_norm / norm)
    return norm


def _all_reduce_flat(grads: list[torch.Tensor], group: ProcessGroup, stats: CommStats | None) -> None:
    """Sum ``grads`` over ``group`` in place with one all-reduce of one flat buffer (none for no gradient)."""
    if not grads:
        return
    flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), group, stats=stats)
    for grad, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(reduced.view_as(grad))


def all_reduce_gradients(model: torch.nn.Module, groups: ParallelGroups, stats: CommStats | None = None) -> None:
    """Sum every gradient over all holders of the same weight shards: the DP x PCP group (one flat all-reduce);
    with MoE layers, the routers' over TP first (and gpt-oss's expert down-projection biases over ETP) and the routed
    experts' over DP only (one flat all-reduce each)."""
    experts = expert_params(model)
    _all_reduce_flat([p.grad for p in router_params(model)], groups.tp_group, stats)
    _all_reduce_flat([p.grad for p in etp_replicated_params(model)], groups.etp_group, stats)
    _all_reduce_flat([p.grad for p in trained_params(model) if id(p) in experts], groups.dp_group, stats)
    _all_reduce_flat([p.grad for p in trained_params(model) if id(p) not in experts], groups.dp_pcp_group, stats)


def all_reduce_loss_and_tokens(local_loss_sum: torch.Tensor, local_num_tokens: int,
                               dp_pcp_group: ProcessGroup, stats: CommStats | None = None) -> tuple[float, int]:
    """``(global token-loss sum, global real-token count)`` summed over ``dp_pcp_group``. TP ranks need
    no reduction: vocab-parallel cross entropy gives every TP rank the full per-token loss."""
    totals = torch.tensor([float(local_loss_sum), float(local_num_tokens)], dtype=torch.float64,
                          device=local_loss_sum.device)
    comm.all_reduce(totals, dp_pcp_group, stats=stats)
    return float(totals[0]), int(totals[1])


@dataclass(frozen=True)
class Gradients:
    """What ``compute_gradients`` leaves besides the gradients: the global mean token ``loss``, the global
    real-token count ``num_tokens``, the load-balancing ``aux_loss`` (0 without MoE or coefficient) and, for an
    MoE model, the step's global ``expert_load`` ``[MoE layers, experts]`` (``moe_balance``; None otherwise)."""

    loss: float
    num_tokens: int
    aux_loss: float = 0.0
    expert_load: torch.Tensor | None = None


def compute_gradients(model: CPGPTModel, runtime: AttentionRuntime, batch: TrainBatch,
                      groups: ParallelGroups, stats: CommStats | None = None, aux_loss_coef: float = 0.0
                      ) -> Gradients:
    """Forward and backward of this rank's ``batch``; leaves in every trained ``param.grad`` the gradient of
    the global mean token loss plus, for an MoE model, ``aux_loss_coef`` times the load-balancing loss
    (``moe_balance``), identical on every holder of the same weights."""
    model.zero_grad(set_to_none=True)
    # Tokens without a target are padding (pack_windows gives every real input one): out of the MoE load.
    token_loss = gpt_forward(model, batch.input_ids, batch.position_ids, runtime, labels=batch.labels,
                             padding_mask=~batch.loss_mask)
    local_loss_sum = torch.where(batch.loss_mask, token_loss, 0.0).sum()
    loss_sum, num_tokens = all_reduce_loss_and_tokens(local_loss_sum.detach(), batch.num_loss_tokens,
                                                      groups.dp_pcp_group, stats)
    if num_tokens == 0:
        raise ValueError("the global batch has no target token with loss_mask set: nothing to train on")
    layers, aux_loss, expert_load = moe_layers(model), 0.0, None
    if layers:
        expert_load, routed_tokens = global_expert_load(layers, groups.tp_group, groups.dp_pcp_group, stats)
        if aux_loss_coef:
            aux_share = load_balancing_loss(layers, expert_load, routed_tokens, aux_loss_coef)
            # Gradients are divided by num_tokens below; the aux loss is not a per-token mean.
            local_loss_sum = local_loss_sum + (aux_share * num_tokens).to(local_loss_sum.dtype)
            aux_loss = load_balancing_loss_value(aux_share.detach(), groups, stats)
    local_loss_sum.backward()
    for param in trained_params(model):
        if param.grad is None:  # e.g. experts no token of this rank's replica chose
            param.grad = torch.zeros_like(param)
    all_reduce_gradients(model, groups, stats)
    for param in trained_params(model):
        param.grad.div_(num_tokens)
    return Gradients(loss_sum / num_tokens, num_tokens, aux_loss, expert_load)


def load_balancing_loss_value(aux_share: torch.Tensor, groups: ParallelGroups, stats: CommStats | None) -> float:
    """The whole auxiliary loss, for reporting: every rank's share summed over TP and DP x PCP."""
    total = aux_share.double().reshape(1).clone()
    comm.all_reduce(total, groups.tp_group, stats=stats)
    comm.all_reduce(total, groups.dp_pcp_group, stats=stats)
    return float(total)


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
    aux_loss: float = 0.0


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
        result = compute_gradients(self.model, self.runtime, self.batch(step), self.groups, stats,
                                   aux_loss_coef=train.moe_aux_loss_coef)
        norm = clip_gradients(self.model, train.grad_clip, self.groups, stats)
        lr = lr_at_step(step, train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if result.expert_load is not None and train.moe_bias_update_rate:
            update_expert_bias(moe_layers(self.model), result.expert_load, train.moe_bias_update_rate)
        self.steps_done += 1
        return StepMetrics(step=step + 1, loss=result.loss, lr=lr, grad_norm=norm, num_tokens=result.num_tokens,
                           tokens_per_s=result.num_tokens / (time.perf_counter() - start), aux_loss=result.aux_loss)

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
