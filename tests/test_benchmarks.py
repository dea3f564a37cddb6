"""Smoke test: benchmarks/bench_engines.py --quick runs end to end on a tiny engine, so it cannot rot.

Only our engine and the transformers base line (both in the project's own install) are measured;
the other peers are optional installs and are not touched here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trtbuild.engine import BuildConfig

from conftest import REPO


def test_bench_engines_quick(tiny_models, engines, tmp_path: Path) -> None:
    hf = tiny_models["llama"]
    engine = engines.engine(hf, BuildConfig(max_batch_size=8, max_input_len=64, max_seq_len=128))
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_engines.py"), "--quick",
                        "--model_dir", str(hf), "--engine", f"tiny={engine}", "--no_default_engine",
                        "--peers", "transformers", "--threads", "1", "--json", str(out),
                        "--cache_dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| engine | precision | MB | decode b1 tok/s | decode b8 tok/s | prefill tok/s |" in r.stdout
    assert "check trtbuild tiny fp32: same 16 greedy tokens as transformers" in r.stdout, r.stdout
    data = json.loads(out.read_text())
    rows = {row["kind"]: row for row in data["rows"]}
    assert set(rows) == {"trtbuild", "transformers"}
    for row in rows.values():
        assert row["decode_b1"] > 0 and row["decode_bN"] > 0 and row["prefill"] > 0
        assert row["roofline"] > 0 and row["mb"] > 0
        assert row["peak_rss_mb"] > 50  # each engine alone in a child process (a tiny model; torch alone is more)
    assert rows["trtbuild"]["vs_transformers"]["b1"] > 0
    assert "fp32 decode b1 vs the best peer fp32: " in r.stdout and "fp32 peak RSS MB" in r.stdout, r.stdout
    assert data["machine"]["bandwidth_gbs"] > 0
    assert not (tmp_path / "cache" / "bench").exists()  # nothing built beside the engine it was given


def test_quant_table_on_tiny_model(tiny_models) -> None:
    """benchmarks/quant_table.py: every recipe's row has a perplexity on each of the three texts
    (w8a16's also relative to fp32), a size and a decode speed, and the table names the CPU."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quant_table.py"), "--model_dir",
                        str(tiny_models["llama"]),
                        "--recipes", "fp32", "w8a16", "--eval_tokens", "1024", "--seq_len", "128", "--rounds", "1",
                        "--num_threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| fp32") or
            line.startswith("| w8a16")]
    assert [row[0].strip() for row in rows] == ["fp32", "w8a16"], r.stdout
    for name, *ppls, mib, tps, build_s in rows:
        assert len(ppls) == 3, r.stdout
        assert all(float(p.split()[0]) > 1 for p in ppls) and float(mib) >= 0 and float(tps) > 0, r.stdout
        assert all(("%)" in p) == (name.strip() == "w8a16") for p in ppls), r.stdout
    assert "CPU: " in r.stdout and "cores)" in r.stdout, r.stdout


def test_profile_runtime_on_tiny_engine(tiny_models, engines) -> None:
    """benchmarks/profile_runtime.py: the decode step's split (session.run, sampling, Python), the
    weights' read against the step, spinning or not, and the operator tables of decode and prefill."""
    engine = engines.engine(tiny_models["llama"], BuildConfig(max_batch_size=2, max_input_len=64, max_seq_len=128))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_runtime.py"), "--engine_dir",
                        str(engine), "--new_tokens", "8", "--prefill_len", "48", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for expected in ("decode step ", "sampling ", "weights read per token ", "not spinning",
                     "## trtbuild onnxruntime profile, decode: 7 decode runs",
                     "## trtbuild onnxruntime profile, one 48-token prefill: 1 prefill runs", "| MatMul |"):
        assert expected in r.stdout, r.stdout


def test_bench_ranks_on_tiny_model(tiny_models, tmp_path: Path) -> None:
    """bench_ranks.py: a tp2 engine under mpiexec beside tp1, one short round, on the tiny llama."""
    if not (Path(sys.executable).parent / "mpiexec").is_file():
        pytest.skip("needs trtbuild[mpi]")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_ranks.py"), "--model_dir",
                        str(tiny_models["llama"]), "--tp", "2", "--rounds", "1", "--new_tokens", "4", "--batch", "2",
                        "--prefill_len", "16", "--cache_dir", str(tmp_path), "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| tp2 |" in r.stdout and "collectives at tp2" in r.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["median"]["tp2"]["b1"] > 0 and result["rows"]["tp2"][0]["threads"] == 1


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_engine(tiny_models, engines, tmp_path_factory) -> Path:
    """The tiny llama (4k positions) with a chat template: what the chat benchmarks send prompts to."""
    import shutil

    engine = tmp_path_factory.mktemp("chat") / "engine"
    shutil.copytree(engines.engine(tiny_models["llama_4k"], BuildConfig(max_batch_size=4, max_input_len=256,
                                                                         max_seq_len=512)), engine)
    (engine / "tokenizer" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return engine


def test_bench_generation_on_tiny_engine(chat_engine, tmp_path: Path) -> None:
    """bench_generation.py: prompt lookup and a draft engine on summaries (identical outputs),
    reuse's time to first token, chunking's inter-token latency, on the tiny engine."""
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generation.py"), "--engine_dir",
                        str(chat_engine), "--draft_engine_dir", str(chat_engine), "--samples", "2",
                        "--max_input_length", "60", "--output_len", "12", "--system_len", "40", "--questions", "2",
                        "--long_len", "100", "--chunk", "16", "--streams", "3", "--chunk_engine_dir",
                        str(chat_engine), "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert all(v["identical_to_plain"] for v in result["speculation"].values())
    assert set(result["speculation"]) == {"plain", "prompt_lookup_4", "draft_engine"}
    assert result["reuse"]["with_reuse"]["ttft_ms_median"] > 0 and result["chunking"]["chunked_16"]["itl_ms_p99"] > 0
    assert "CPU: " in r.stdout


def test_bench_serve_quick_on_tiny_engine(chat_engine, tmp_path: Path) -> None:
    """bench_serve.py --quick with our server only (llama.cpp's is an optional install)."""
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--quick", "--engine",
                        f"tiny={chat_engine}", "--gguf", "none", "--words", "20", "--num_threads", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| trtbuild-serve | tiny | 1 |" in r.stdout and "| trtbuild-serve | tiny | 2 |" in r.stdout, r.stdout
    assert json.loads(out.read_text())
