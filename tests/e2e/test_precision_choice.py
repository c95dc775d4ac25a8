"""Issue 20 item 4: with mixed_precision=auto, rank 0 decides and every rank follows, even where the ranks' own
measurements disagree (each rank timing its own matmuls could build different mixed-precision policies)."""
import json


def test_rank_0_decides_the_precision_for_every_rank(tmp_path, run_script):
    out = tmp_path / "choice.json"
    result = run_script("tests/e2e/precision_worker.py", out, nproc=2)
    ranks = json.loads(out.read_text())
    # rank 0 measured bf16 as 50x slower: fp32 everywhere, no bf16 compute policy on any rank
    assert [(r["rank"], r["bf16"], r["param_dtype"]) for r in ranks] == [(0, False, "None"), (1, False, "None")]
    assert result.stdout.count("precision: fp32 (--mixed_precision=auto: bf16 matmuls run 50x slower") == 1
