"""A decode step's model forward never waits on the host: no ``int()``/``bool()``/``.item()``
(``aten::_local_scalar_dense``), no ``nonzero``/``masked_select``/``unique``, no ``Tensor.tolist`` runs inside
it, at 1 rank and at TP2 x PCP2 x DCP4, for plain decoding, for speculative decoding's ``L > 1`` tokens per
row, and for multi-head latent attention's latent-only cache (``values_are_keys``). The step is planned on the host before the forward (``PagedKVCache.views``); sampling is outside the
forward and not counted here."""
import collections
import contextlib
import copy
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cptoolkit.inference.model_runner as runner_module
from cptoolkit.config import config_from_dict
from cptoolkit.inference.builder import build_engine
from cptoolkit.inference.sampling import SamplingParams
from cptoolkit.parallel_state import destroy_model_parallel, initialize_model_parallel
from tests.multiproc import run_ranks

# The aten ops that copy a device value to the host (or size an output by one): each is a host round-trip.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
            "unique_consecutive", "item"}
# A boolean-mask index sizes its output by the mask's count (a nonzero inside the kernel, not dispatched).
BOOL_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}
BASE = {"parallel": {}, "runtime": {"device": "cpu"},
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2,
                  "ffn_hidden_size": 96, "vocab_size": 320, "max_seq_len": 96, "seed": 7},
        "inference": {"prompts": ["x"], "batch_size": 3, "kv_block_size": 4}}
# Different lengths, so the rows of a step hold different shard lengths; repeats, so n-gram drafts exist. The
# MLA checkpoint's word tokenizer has 64 ids: its prompts are ids.
PROMPTS = ["a b a b a b a b", "KV shards merge by log-sum-exp", "x"]
MLA_PROMPTS = [[5, 6, 5, 6, 5, 6, 5, 6], [9, 12, 3, 44, 17, 2, 30, 8, 21, 11, 7], [13]]


def _bool_mask_sizes_output(name: str, args: tuple) -> bool:
    """Whether ``aten.<name>(self, indices, [values])`` indexes by a boolean mask in a way that needs the mask's
    count on the host. Not so for ``x[mask] = scalar``: one mask and a 0-dim value, which ``index_put_`` turns
    into ``masked_fill_`` (ATen's ``canDispatchToMaskedFill``; megatron's TP embedding masks its input so)."""
    defined = [i for i in args[1] if i is not None]
    if not any(i.dtype == torch.bool for i in defined):
        return False
    return not (name != "index" and len(defined) == 1 and args[2].dim() == 0)


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if "cptoolkit" in f.filename or "megatron" in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class SyncCounter(TorchDispatchMode):
    """Counts the host round-trips dispatched while active, by op and source line (``found``), and
    ``Tensor.tolist`` calls (which bypass the dispatcher) while ``counting_tolist`` is entered."""

    def __init__(self):
        super().__init__()
        self.found = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            self.found[f"{name} at {_where()}"] += 1
        elif name in BOOL_INDEXED and _bool_mask_sizes_output(name, args):
            self.found[f"bool_mask_{name} at {_where()}"] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting_tolist(self):
        original = torch.Tensor.tolist

        def tolist(tensor):
            self.found[f"tolist at {_where()}"] += 1
            return original(tensor)
        torch.Tensor.tolist = tolist
        try:
            yield
        finally:
            torch.Tensor.tolist = original


def _config(tp, pcp, dcp, case, checkpoint):
    raw = copy.deepcopy(BASE)
    raw["parallel"] = {"tp": tp, "pcp": pcp, "dcp": dcp}
    if case == "ngram":
        raw["inference"].update(speculative_method="ngram", num_speculative_tokens=3)
    if case == "mla":
        raw["model"] = {"checkpoint": checkpoint}
    return config_from_dict(raw, source="<test>")


def _decode_syncs_rank(rank, world_size, case, checkpoint):
    """Generate with every decode forward run under a ``SyncCounter``; returns ``(decode forwards, widest step
    (tokens per row), syncs found)``."""
    tp, pcp, dcp = (2, 2, 4) if world_size == 4 else (1, 1, 1)
    cfg = _config(tp, pcp, dcp, case, checkpoint)
    groups = initialize_model_parallel(tp=tp, pcp=pcp, dcp=dcp, num_heads=cfg.model.num_attention_heads,
                                       num_kv_heads=cfg.model.num_kv_heads)
    counter, forwards, widths = SyncCounter(), [0], [0]
    real_forward = runner_module.gpt_forward

    def counted_forward(model, input_ids, *args, **kwargs):
        forwards[0] += 1
        widths[0] = max(widths[0], input_ids.shape[1])
        with counter, counter.counting_tolist():
            return real_forward(model, input_ids, *args, **kwargs)

    runner_module.gpt_forward = counted_forward  # the model runner's decode step is its only caller
    try:
        engine = build_engine(cfg, groups, torch.device("cpu"))
        engine.generate(MLA_PROMPTS if case == "mla" else PROMPTS, [SamplingParams(temperature=0.0, max_new_tokens=n) for n in (9, 6, 4)])
        return forwards[0], widths[0], dict(counter.found)
    finally:
        runner_module.gpt_forward = real_forward
        destroy_model_parallel()


def test_the_counter_sees_every_kind_of_host_round_trip():
    counter, x = SyncCounter(), torch.tensor([0, 3, 0, 5])
    with counter, counter.counting_tolist():
        int(x.max()), bool(x.any()), x.sum().item(), x.nonzero(), x[x > 0], x.unique(), x.tolist()
        x[x > 0] = torch.tensor([7, 8])  # one value per masked element: sized by the mask's count
        x[x > 7] = 0  # masked_fill_: no round-trip
        x[torch.tensor([1, 3])]  # an integer index: no round-trip
    kinds = collections.Counter(where.split(" ")[0] for where in counter.found.elements())
    assert kinds == {"_local_scalar_dense": 3, "nonzero": 1, "bool_mask_index": 1, "bool_mask_index_put_": 1,
                     "_unique2": 1, "tolist": 1}, kinds


@pytest.fixture(scope="module")
def mla_checkpoint(tmp_path_factory):
    """A DeepSeek-V3 checkpoint (multi-head latent attention) from ``test_mla``, random weights."""
    from tests.hf_checkpoints import word_tokenizer
    from tests.test_mla import _hf_model
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("mla")
    _hf_model("v3").save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("case", ["plain", "ngram", "mla"])
@pytest.mark.parametrize("world_size", [1, 4], ids=["1rank", "tp2xpcp2xdcp4"])
def test_decode_forward_has_no_host_round_trip(world_size, case, request):
    checkpoint = request.getfixturevalue("mla_checkpoint") if case == "mla" else None
    for rank, (forwards, width, found) in enumerate(run_ranks(world_size, _decode_syncs_rank, case, checkpoint,
                                                              timeout_s=300)):
        assert forwards >= 5, f"rank {rank}: only {forwards} decode forwards ran"
        assert (width > 1) == (case == "ngram"), f"rank {rank}: widest decode step {width} tokens per row"
        assert not found, f"rank {rank}: host round-trips inside the decode forward: {found}"
