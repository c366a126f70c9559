"""bench/mla_decode.py at tiny sizes: its schema, and that each rank's latent bytes are exactly the context's
latent over DCP (times the copies TP alone keeps), with the same collectives at every context length."""
from __future__ import annotations

import json

from bench import mla_decode


def test_mla_decode_bytes_copies_and_collectives(tmp_path):
    contexts = [96, 200]
    assert mla_decode.main(["--context-lens", *map(str, contexts), "--steps", "1",
                            "--results-dir", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "mla_decode.json").read_text())
    rows = document["results"]
    labels = {layout.label for layouts in mla_decode.LAYOUTS.values() for layout in layouts}
    assert {(r["context_len"], r["label"]) for r in rows} == {(c, label) for c in contexts for label in labels}
    latent = mla_decode.V2_LITE.latent_dim
    for row in rows:
        assert row["median_s"] > 0 and row["reps"] == 2, row
        # The fullest shard of the context (interleave 1): ceil(context / dcp) tokens of one 576-wide latent.
        assert row["latent_bytes_per_rank_layer"] == -(-row["context_len"] // row["dcp"]) * latent * 4, row
        assert row["latent_copies"] == row["tp"] * row["pcp"] / row["dcp"], row
        assert (row["calls_per_step"] == {}) == (row["dcp"] == 1), row
        same_layout = [r for r in rows if r["label"] == row["label"]]
        assert all(r["calls_per_step"] == row["calls_per_step"] for r in same_layout), row
