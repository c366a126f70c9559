"""DualChunkSwap partitioning: pure tests, no process is launched; megatron-core's own
``get_batch_on_this_cp_rank`` is the independent reference for the shards."""
from __future__ import annotations

import pytest
import torch

from cptoolkit.layers.dual_chunk_swap import (
    causal_work, chunk_ids, last_token_owner, padded_length, partition_batch, shard_positions,
    shard_sequence, token_owner, unshard_sequence)

PCP_SIZES = (1, 2, 4, 8)


def _causal_attention_f64(x: torch.Tensor) -> torch.Tensor:
    """Plain softmax self-attention of ``x [s, d]`` (q = k = v = x) with a causal mask, float64."""
    x = x.double()
    scores = x @ x.T
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ x


def test_chunk_ids_pair_each_chunk_with_its_mirror():
    assert chunk_ids(0, 1) == (0, 1)
    assert [chunk_ids(r, 4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]


def test_padded_length_is_the_next_multiple_of_two_pcp():
    assert [padded_length(n, 2) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 12]
    assert padded_length(1, 8) == 16
    assert padded_length(32, 8) == 32


@pytest.mark.parametrize("pcp_size", PCP_SIZES)
def test_shard_then_unshard_round_trips_odd_lengths(pcp_size):
    for seq_len in (1, 7, 13, 37):
        seq_len_padded = padded_length(seq_len, pcp_size)
        for seq_dim, shape in ((0, (seq_len_padded,)), (1, (2, seq_len_padded, 3)), (2, (2, 3, seq_len_padded, 4)),
                               (-1, (3, seq_len_padded))):
            x = torch.randn(shape)
            shards = [shard_sequence(x, r, pcp_size, seq_dim) for r in range(pcp_size)]
            assert all(s.shape[seq_dim] == seq_len_padded // pcp_size for s in shards)
            assert torch.equal(unshard_sequence(torch.stack(shards), pcp_size, seq_dim), x), (seq_len, seq_dim)


@pytest.mark.parametrize("pcp_size", PCP_SIZES)
def test_shard_positions_partition_the_sequence(pcp_size):
    seq_len_padded = 6 * pcp_size
    c = 3
    held = []
    for r in range(pcp_size):
        positions = shard_positions(seq_len_padded, r, pcp_size)
        first, second = chunk_ids(r, pcp_size)
        assert positions.tolist() == [*range(first * c, first * c + c), *range(second * c, second * c + c)]
        assert torch.equal(positions, shard_sequence(torch.arange(seq_len_padded), r, pcp_size, seq_dim=0))
        held += positions.tolist()
    assert sorted(held) == list(range(seq_len_padded))


@pytest.mark.parametrize("pcp_size", PCP_SIZES)
def test_token_owner_finds_every_position(pcp_size):
    seq_len_padded = 4 * pcp_size
    for position in range(seq_len_padded):
        pcp_rank, local_index = token_owner(position, seq_len_padded, pcp_size)
        assert shard_positions(seq_len_padded, pcp_rank, pcp_size)[local_index] == position
    assert last_token_owner(1, seq_len_padded, pcp_size) == (0, 0)


def _brute_force_work(positions: torch.Tensor, seq_len_padded: int) -> int:
    mask = torch.ones(seq_len_padded, seq_len_padded, dtype=torch.bool).tril()
    return int(mask[positions].sum())


@pytest.mark.parametrize("pcp_size", PCP_SIZES)
def test_dual_chunk_swap_balances_causal_work(pcp_size):
    """DualChunkSwap: every rank does exactly the same work. Contiguous: the last rank does
    ``1 + 4c(P-1)/(2c+1)`` times the first rank's work, which tends to ``2P-1`` as chunks grow."""
    for c in (1, 3, 16, 256):
        seq_len_padded = 2 * pcp_size * c
        dual = [causal_work(r, pcp_size, seq_len_padded) for r in range(pcp_size)]
        contiguous = [causal_work(r, pcp_size, seq_len_padded, split="contiguous") for r in range(pcp_size)]
        assert max(dual) == min(dual), dual
        if c <= 16:
            assert dual[-1] == _brute_force_work(shard_positions(seq_len_padded, pcp_size - 1, pcp_size),
                                                 seq_len_padded)
            local_len = 2 * c
            last_positions = torch.arange((pcp_size - 1) * local_len, pcp_size * local_len)
            assert contiguous[-1] == _brute_force_work(last_positions, seq_len_padded)
        ratio = max(contiguous) / min(contiguous)
        assert ratio == pytest.approx(1 + 4 * c * (pcp_size - 1) / (2 * c + 1), rel=1e-12)
        # The shortfall from 2P-1 is the diagonal block's missing upper half: (2P-2)/(2c+1).
        assert 2 * pcp_size - 1 - ratio == pytest.approx((2 * pcp_size - 2) / (2 * c + 1), abs=1e-12)
    assert sum(dual) == seq_len_padded * (seq_len_padded + 1) // 2


@pytest.mark.parametrize("pcp_size", (2, 4, 8))
def test_shards_equal_megatron_get_batch_on_this_cp_rank(pcp_size, monkeypatch):
    """Independent reference: megatron-core's own ``get_batch_on_this_cp_rank`` slices the same shards.

    Called without a ``cp_group`` it reads the CP size and rank from ``parallel_state``'s getters, which
    need initialized process groups; they are monkeypatched to return ``(pcp_size, pcp_rank)`` so that
    megatron's pure slicing runs in this process."""
    from megatron.core import parallel_state, utils

    seq_len_padded = 2 * pcp_size * 3
    gen = torch.Generator().manual_seed(pcp_size)
    full = {"tokens": torch.randint(1000, (2, seq_len_padded), generator=gen),  # [b, s]
            "position_ids": torch.arange(seq_len_padded).expand(2, -1),  # [b, s]
            "hidden": torch.randn(2, seq_len_padded, 5, generator=gen),  # [b, s, h]
            "attention_mask": torch.rand(2, 1, seq_len_padded, seq_len_padded, generator=gen) < 0.5}  # [b,1,s,s]
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: pcp_size)
    for pcp_rank in range(pcp_size):
        monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda rank=pcp_rank: rank)
        megatron = utils.get_batch_on_this_cp_rank(dict(full))
        for key, value in full.items():
            seq_dim = 2 if key == "attention_mask" else 1  # megatron shards the mask's query rows only
            ours = shard_sequence(value, pcp_rank, pcp_size, seq_dim=seq_dim)
            assert torch.equal(ours, megatron[key]), f"pcp_size={pcp_size} pcp_rank={pcp_rank}: {key} differs"
        batch = partition_batch(full["tokens"].tolist(), pcp_rank, pcp_size, pad_id=-1)
        assert torch.equal(batch.input_ids, megatron["tokens"]), f"pcp_rank={pcp_rank}: partition_batch tokens"
        assert torch.equal(batch.position_ids, megatron["position_ids"]), f"pcp_rank={pcp_rank}: positions"
        assert torch.equal(shard_positions(seq_len_padded, pcp_rank, pcp_size), megatron["position_ids"][0])


def _check_batch(batches, sequences, pad_id):
    pcp_size = len(batches)
    seq_len_padded = batches[0].seq_len_padded
    assert seq_len_padded == padded_length(max(map(len, sequences)), pcp_size)
    for r, batch in enumerate(batches):
        assert batch.input_ids.shape == (len(sequences), seq_len_padded // pcp_size)
        positions = shard_positions(seq_len_padded, r, pcp_size)
        assert torch.equal(batch.position_ids, positions.expand(len(sequences), -1))
        assert torch.equal(batch.valid, positions.unsqueeze(0) < torch.tensor([len(s) for s in sequences])[:, None])
        assert torch.all(batch.input_ids[~batch.valid] == pad_id)
    restored = batches[0].restore(torch.stack([b.input_ids for b in batches]))
    assert [seq.tolist() for seq in restored] == sequences
    for i, (pcp_rank, local_index) in enumerate(batches[0].last_token_owners()):
        assert batches[pcp_rank].input_ids[i, local_index] == sequences[i][-1]
        assert batches[pcp_rank].valid[i, local_index]


@pytest.mark.parametrize("pcp_size", PCP_SIZES)
def test_partition_batch_lists_and_packed_thd_agree_and_restore(pcp_size):
    sequences = [[5, 6, 7, 8, 9], [3], [10 + i for i in range(11)]]
    pad_id = -1
    from_lists = [partition_batch(sequences, r, pcp_size, pad_id) for r in range(pcp_size)]
    _check_batch(from_lists, sequences, pad_id)
    packed = torch.tensor([t for seq in sequences for t in seq])
    cu_seqlens = torch.tensor([0, 5, 6, 17])
    from_packed = [partition_batch(packed, r, pcp_size, pad_id, cu_seqlens=cu_seqlens) for r in range(pcp_size)]
    for a, b in zip(from_lists, from_packed):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.valid, b.valid) and a.seq_lens == b.seq_lens


@pytest.mark.parametrize("pcp_size", (2, 4))
def test_end_padding_never_changes_real_tokens_attention(pcp_size):
    """Causal attention over the padded batch, sharded and restored, equals unpadded per-sequence
    attention: padding sits after every real token, so the causal mask hides it."""
    torch.manual_seed(0)
    seq_lens = [3, 9, 14]
    hidden = 4
    embedding = torch.randn(32, hidden)
    sequences = [torch.randint(0, 30, (n,)).tolist() for n in seq_lens]
    batches = [partition_batch(sequences, r, pcp_size, pad_id=31) for r in range(pcp_size)]
    seq_len_padded = batches[0].seq_len_padded
    full_ids = unshard_sequence(torch.stack([b.input_ids for b in batches]), pcp_size, seq_dim=1)
    padded_out = torch.stack([_causal_attention_f64(embedding[ids]) for ids in full_ids])  # [b, S, h]
    local_outs = torch.stack([shard_sequence(padded_out, r, pcp_size, seq_dim=1) for r in range(pcp_size)])
    restored = batches[0].restore(local_outs, seq_dim=1)
    for i, ids in enumerate(sequences):
        expected = _causal_attention_f64(embedding[torch.tensor(ids)])
        torch.testing.assert_close(restored[i], expected, rtol=0, atol=1e-12)
    assert seq_len_padded > max(seq_lens)


def test_invalid_arguments_name_the_rule():
    with pytest.raises(ValueError, match=r"pcp_rank \(2\) must be in \[0, pcp_size=2\)"):
        chunk_ids(2, 2)
    with pytest.raises(ValueError, match=r"pcp_size \(0\) must be at least 1"):
        padded_length(5, 0)
    with pytest.raises(ValueError, match=r"seq_len \(0\) must be at least 1"):
        padded_length(0, 2)
    with pytest.raises(ValueError, match=r"seq_len_padded \(6\) must be a positive multiple of 2 \* pcp_size \(4\)"):
        shard_sequence(torch.zeros(6), 0, 2, seq_dim=0)
    with pytest.raises(ValueError, match=r"gathered must be \[pcp_size=2"):
        unshard_sequence(torch.zeros(3, 4), 2, seq_dim=0)
    with pytest.raises(ValueError, match=r"local sequence length \(3\) on dim 0 must be even"):
        unshard_sequence(torch.zeros(2, 3), 2, seq_dim=0)
    with pytest.raises(ValueError, match=r"split \('zigzag'\) must be one of"):
        causal_work(0, 2, 8, split="zigzag")
    with pytest.raises(ValueError, match=r"position \(8\) must be in \[0, seq_len_padded=8\)"):
        token_owner(8, 8, 2)
    with pytest.raises(ValueError, match=r"cu_seqlens \(\[0, 2, 4\]\) must start at 0 and end at the packed length \(5\)"):
        partition_batch(torch.arange(5), 0, 2, pad_id=0, cu_seqlens=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match=r"every sequence needs at least one token; got lengths \[2, 0\]"):
        partition_batch([[1, 2], []], 0, 2, pad_id=0)
    batch = partition_batch([[1, 2]], 0, 1, pad_id=0)
    with pytest.raises(ValueError, match=r"seq_dim \(0\) must be at least 1"):
        batch.restore(batch.input_ids.unsqueeze(0), seq_dim=0)
