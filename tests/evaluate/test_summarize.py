"""summarize.py: ROUGE and reference perplexity of the engine beside transformers, accuracy checks, bad data."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from trtbuild.builder import build_engine
from trtbuild.engine import BuildConfig, LoraConfig
from trtbuild.evaluate.dataset import load_records, select
from trtbuild.evaluate.sides import load_text_tokenizer
from trtbuild.evaluate.summarize import TLDR, main, make_samples

from conftest import REPO, SHARED

torch.set_num_threads(1)

SUMMARIZE_DATA = SHARED / "data" / "summarize.jsonl"
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")

ARTICLES = [
    ("a1", "The city council met on Monday to discuss the new park. Residents asked for more trees and a "
           "playground. The mayor promised a decision next month after a public survey.",
     "Council discussed a new park.\nResidents want trees and a playground."),
    ("a2", "A storm crossed the coast overnight, cutting power to thousands of homes. Crews worked until "
           "morning to restore the lines, and schools opened two hours late.",
     "A storm cut power overnight.\nSchools opened late."),
    ("a3", "Researchers trained a small language model on scientific abstracts and measured how well it "
           "summarized new papers. Larger models did better, but the small one was fast.",
     "A small model summarizes papers.\nLarger models score higher."),
    ("a4", "The library will extend its opening hours during exams. Students can borrow laptops and book "
           "quiet rooms online. The change starts next week and runs for a month.",
     "The library opens longer during exams."),
    ("a5", "A local bakery won a national prize for its sourdough bread. The owners said the secret is time: "
           "the dough rests for two days before baking.",
     "A bakery won a prize for sourdough."),
    ("a6", "Engineers tested a new bridge design with sensors that report strain in real time. The data "
           "showed the structure handled twice the expected load.",
     "A new bridge design was tested.\nIt held twice the expected load."),
]


# one long article, so that --max_input_length decides how much of it the prompt keeps
ARTICLES[5] = (ARTICLES[5][0], " ".join([ARTICLES[5][1]] * 8), ARTICLES[5][2])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(n=len(ARTICLES)):
    return [{"id": i, "article": a, "highlights": h} for i, a, h in ARTICLES[:n]]


LIMITS = dict(max_batch_size=4, max_input_len=128, max_seq_len=160)


@pytest.fixture(scope="module")
def tiny(tiny_models, engines, module_tmp):
    """(hf model dir, engine dir, dataset file) for a tiny Llama."""
    model = tiny_models["llama"]
    return model, engines.engine(model, BuildConfig(**LIMITS)), write_jsonl(module_tmp / "data.jsonl", records())


def run_summarize(args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def base_args(tiny, out: Path, *extra):
    model, engine, data = tiny
    return ["--engine_dir", engine, "--hf_model_dir", model, "--dataset_file", data, "--batch_size", 2,
            "--max_ite", 3, "--max_input_length", 48, "--output_len", 8, "--num_threads", 1, "--no_progress",
            "--output_dir", out, *extra]


def test_end_to_end_writes_metrics_and_outputs(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_summarize(base_args(tiny, out, "--eval_ppl")) == 0
    stdout = capsys.readouterr().out
    assert "rouge1 difference, engine - hf" in stdout and "tokens per second" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("engine", "hf"):
        m = metrics[side]
        assert set(ROUGE) <= set(m) and all(0 <= m[k] <= 100 for k in ROUGE)
        assert m["num_samples"] == 6 and m["output_tokens"] > 0 and m["tokens_per_s"] > 0
        lines = (out / f"{side}_outputs.jsonl").read_text().splitlines()
        assert len(lines) == 6 and {"id", "output", "reference"} <= set(json.loads(lines[0]))
    engine_out = [json.loads(x)["output"] for x in (out / "engine_outputs.jsonl").read_text().splitlines()]
    hf_out = [json.loads(x)["output"] for x in (out / "hf_outputs.jsonl").read_text().splitlines()]
    assert engine_out == hf_out  # greedy, fp32: the same tokens
    assert metrics["engine_minus_hf"]["rouge1"] == 0
    assert metrics["engine"]["perplexity"] == pytest.approx(metrics["hf"]["perplexity"], rel=1e-4)
    assert metrics["settings"]["chat_template"] is False


def test_only_one_side_and_eval_ppl_task(tiny, tmp_path):
    model, engine, data = tiny
    out = tmp_path / "out"
    assert run_summarize(["--engine_dir", engine, "--dataset_file", data, "--max_ite", 2, "--max_input_length", 32,
                          "--eval_task", "eval_ppl", "--no_progress", "--output_dir", out]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "hf" not in metrics and "rouge1" not in metrics["engine"] and metrics["engine"]["perplexity"] > 1
    assert not (out / "engine_outputs.jsonl").exists()


def test_check_accuracy_fails_above_what_is_achieved(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_summarize(base_args(tiny, out, "--check_accuracy", "--tensorrt_llm_rouge1_threshold", 101))
    assert code == 1
    err = capsys.readouterr().err
    assert "rouge1" in err and "is below --tensorrt_llm_rouge1_threshold 101" in err
    assert (out / "metrics.json").is_file()  # the numbers are kept for the user to look at


def test_check_accuracy_perplexity_threshold(tiny, tmp_path, capsys):
    code = run_summarize(base_args(tiny, tmp_path / "out", "--test_trt_llm", "--eval_ppl", "--check_accuracy",
                                   "--tensorrt_llm_rouge1_threshold", 0, "--tensorrt_llm_ppl_threshold", 1.5))
    assert code == 1
    err = capsys.readouterr().err
    assert "engine perplexity" in err and "above --tensorrt_llm_ppl_threshold 1.5" in err and "rouge1" not in err


README_CHECK = ["--eval_ppl", "--check_accuracy", "--tensorrt_llm_rouge1_threshold", 0]  # a random model's rouge is ~0


def test_readme_check_passes_on_a_correct_engine_and_fails_on_a_broken_one(tiny, engines, tmp_path, capsys):
    """The README's command (--eval_ppl --check_accuracy, perplexity thresholds left at their defaults) judges the
    engine's perplexity against the transformers model's: the correct engine passes, a broken one fails."""
    from safetensors.numpy import load_file, save_file

    assert run_summarize(base_args(tiny, tmp_path / "good", *README_CHECK)) == 0
    out = capsys.readouterr().out
    assert "accuracy check passed" in out and "perplexity ratio, engine / hf: 1.0000" in out
    assert json.loads((tmp_path / "good" / "metrics.json").read_text())["engine_over_hf"]["perplexity"] == \
        pytest.approx(1.0, abs=1e-4)

    model, _, data = tiny  # broken: the final norm's weights x4, so every logit is 4x too large
    shutil.copytree(engines.checkpoint(model), tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "rank0.safetensors")
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"] * 4
    save_file(tensors, tmp_path / "ckpt" / "rank0.safetensors")
    build_engine(tmp_path / "ckpt", tmp_path / "broken", BuildConfig(**LIMITS), progress=False)
    code = run_summarize(base_args((model, tmp_path / "broken", data), tmp_path / "bad", *README_CHECK))
    err = capsys.readouterr().err
    assert code == 1, err
    assert re.search(r"engine perplexity [\d.]+ is [\d.]+x the transformers model's [\d.]+, above "
                     r"--ppl_ratio_threshold 1.1", err), err


def test_ppl_ratio_threshold_is_the_flag_that_decides(tiny, tmp_path, capsys):
    """The same broken-free engine fails a ratio below 1 (its perplexity equals the model's), and a run without
    the transformers side says that the perplexity was not checked."""
    assert run_summarize(base_args(tiny, tmp_path / "a", *README_CHECK, "--ppl_ratio_threshold", 0.99)) == 1
    assert "above --ppl_ratio_threshold 0.99" in capsys.readouterr().err
    model, engine, data = tiny
    code = run_summarize(["--engine_dir", engine, "--dataset_file", data, "--max_ite", 2, "--max_input_length", 32,
                          "--output_len", 4, "--no_progress", *README_CHECK])
    captured = capsys.readouterr()
    assert code == 0 and "accuracy check passed" in captured.out
    assert "perplexity is not checked" in captured.err and "--hf_model_dir" in captured.err


def test_check_accuracy_passes_within_thresholds(tiny, tmp_path, capsys):
    code = run_summarize(base_args(tiny, tmp_path / "out", "--test_trt_llm", "--check_accuracy",
                                   "--tensorrt_llm_rouge1_threshold", 0))
    assert code == 0 and "accuracy check passed" in capsys.readouterr().out


def _bad_file(tmp_path, kind):
    p = tmp_path / "data.jsonl"
    if kind == "corrupt":
        p.write_text(json.dumps(records(1)[0]) + "\n{\"article\": \"cut off\n")
    elif kind == "empty":
        p.write_text("")
    elif kind == "no_fields":
        write_jsonl(p, [{"text": "a", "summary": "b"}])
    elif kind == "not_a_string":
        write_jsonl(p, [{"id": 1, "article": ["a"], "highlights": "b"}])
    elif kind == "unknown_suffix":
        p = tmp_path / "data.xml"
        p.write_text("<a/>")
    elif kind == "missing":
        p = tmp_path / "nope.jsonl"
    return ["--dataset_file", p]


@pytest.mark.parametrize("kind, message", [
    ("corrupt", "line 2 is not valid JSON"),
    ("empty", "is empty"),
    ("no_fields", "has no 'article' field"),
    ("not_a_string", "'article' is a list, not a string"),
    ("unknown_suffix", "unknown format '.xml'"),
    ("missing", "not found"),
])
def test_bad_dataset_file_exits_2_with_one_clear_line(tmp_path, capsys, kind, message):
    code = run_summarize(["--engine_dir", tmp_path / "unused", *_bad_file(tmp_path, kind)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    if kind not in ("missing",):
        assert "'article'" in err and "'highlights'" in err  # says what layout is expected


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "has no .json, .jsonl, .parquet or .csv files"),
    (lambda d: write_jsonl(d / "other.jsonl", [{"text": "x"}]), "has no usable records"),
    (lambda d: (d / "bad.json").write_text("[{\"article\": "), "bad.json line 1 is not valid JSON"),
])
def test_bad_dataset_dir_exits_2(tmp_path, capsys, setup, message):
    d = tmp_path / "data"
    d.mkdir()
    setup(d)
    assert run_summarize(["--engine_dir", tmp_path / "unused", "--dataset_dir", d]) == 2
    assert message in capsys.readouterr().err


def test_no_dataset_given_exits_2(tmp_path, capsys):
    assert run_summarize(["--engine_dir", tmp_path / "unused"]) == 2
    assert "--dataset_dir DIR or --dataset_file FILE" in capsys.readouterr().err


def test_dataset_dir_reads_every_format_and_skips_unrelated_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = records()
    d = tmp_path / "cnn"
    (d / "3.0.0").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", rows[:2])
    (d / "b.json").write_text(json.dumps(rows[2:3]))
    with open(d / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "article", "highlights"])
        w.writeheader()
        w.writerows(rows[3:4])
    pq.write_table(pa.Table.from_pylist(rows[4:]), d / "3.0.0" / "test-00000-of-00001.parquet")
    write_jsonl(d / "unrelated.jsonl", [{"text": "not a summarization record"}])
    (d / "README.md").write_text("ignored")
    got = load_records(dataset_dir=d)
    assert sorted(r.id for r in got) == [f"a{i}" for i in range(1, 7)]
    assert next(r for r in got if r.id == "a4").article == rows[3]["article"]  # CSV round trip
    first, again, other = (select(got, seed, 4) for seed in (0, 0, 1))
    assert [r.id for r in first] == [r.id for r in again] != [r.id for r in other]
    # JSON lines under a .json name (what datasets' to_json writes) read too
    write_jsonl(tmp_path / "lines.json", rows[:3])
    assert len(load_records(dataset_file=tmp_path / "lines.json")) == 3


def test_prompts_truncate_the_article_and_follow_the_chat_template(tiny, tmp_path):
    model, engine, _ = tiny
    tok_dir = engine / "tokenizer"
    tok = load_text_tokenizer(tok_dir)
    recs = load_records(dataset_file=tiny[2])
    plain = make_samples(recs, tok, tok_dir, 10, use_chat=False, with_references=True)
    for s in plain:
        assert s.prompt_text.endswith(TLDR)
        assert len(tok.encode(s.prompt_text[:-len(TLDR)], add_special_tokens=False).ids) <= 11
        assert s.reference_ids == tok.encode(s.record.highlights, add_special_tokens=False).ids
    chat_dir = tmp_path / "tok"
    shutil.copytree(tok_dir, chat_dir)
    (chat_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    chat = make_samples(recs, tok, chat_dir, 10, use_chat=True, with_references=False)
    assert chat[0].prompt_text.startswith("<s>user: Summarize") and chat[0].prompt_text.endswith("<s>assistant: ")
    assert chat[0].prompt_ids[0] == tok.token_to_id("<s>")


@pytest.mark.parametrize("extra, message", [
    (["--batch_size", 8], "--batch_size 8 exceeds the engine's max_batch_size 4"),
    (["--max_input_length", 200], "above the engine's max_input_len 128"),
    (["--output_len", 150], "exceeds the engine's max_seq_len 160"),
    (["--num_beams", 4], "beam search"),
    (["--lora_dir", "/nonexistent/adapter"], "built without --lora_plugin"),
    (["--lora_task_uids", 0], "has no adapters"),
    (["--test_hf", "--check_accuracy"], "--check_accuracy checks the engine"),
])
def test_bad_flags_exit_2(tiny, tmp_path, capsys, extra, message):
    model, engine, data = tiny
    args = ["--engine_dir", engine, "--dataset_file", data, "--max_ite", 6, "--max_input_length", 48,
            "--output_len", 8, "--no_progress", *extra]
    if "--test_hf" in extra:
        args = ["--hf_model_dir", model, *args]
    assert run_summarize(args) == 2
    assert message in capsys.readouterr().err


def test_example_script_is_the_same_command():
    import subprocess

    out = subprocess.run([sys.executable, str(REPO / "examples" / "summarize.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--engine_dir", "--hf_model_dir", "--tokenizer_dir", "--test_trt_llm", "--test_hf", "--data_type",
                 "--dataset_dir", "--dataset_file", "--eval_task", "--batch_size", "--max_ite", "--max_input_length",
                 "--output_len", "--num_beams", "--temperature", "--top_k", "--top_p", "--random_seed",
                 "--check_accuracy", "--tensorrt_llm_rouge1_threshold", "--tensorrt_llm_ppl_threshold",
                 "--ppl_ratio_threshold", "--eval_ppl", "--output_dir", "--lora_dir", "--lora_task_uids",
                 "--no_chat_template"):
        assert flag in out, flag
    text = " ".join(out.split())  # --help shows the defaults
    for shown in ("must reach this (default: 15.0)", "pass a larger RATIO for those) (default: 1.1)",
                  "--top_k TOP_K 1 = greedy (as in TensorRT-LLM) (default: 1)", "(default: summarize)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.slow
def test_real_model_engine_agrees_with_transformers(real_model_dir, engines, tmp_path, capsys):
    """SmolLM2 fp32 engine vs transformers on 20 papers of summarize.jsonl: rouge1 within 1 point, and the
    README's command (its flags and default perplexity thresholds) passes --check_accuracy.

    One thread per side: on the 2 shared cores of CI, 2 threads spin against other jobs and run 2-3x slower.
    """
    engine = engines.engine(real_model_dir, BuildConfig(max_batch_size=4, max_input_len=1024, max_seq_len=1024))
    out = tmp_path / "out"
    code = run_summarize(["--engine_dir", engine, "--hf_model_dir", real_model_dir,
                          "--dataset_file", SUMMARIZE_DATA, "--batch_size", 4, "--max_ite", 5,
                          "--max_input_length", 512, "--output_len", 64, "--eval_ppl", "--num_threads", 1,
                          "--no_progress", "--output_dir", out, "--check_accuracy",
                          "--tensorrt_llm_rouge1_threshold", 30])
    print(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    print(json.dumps(metrics, indent=1))
    assert code == 0
    assert metrics["engine"]["num_samples"] == metrics["hf"]["num_samples"] == 20
    assert abs(metrics["engine_minus_hf"]["rouge1"]) <= 1.0
    assert metrics["engine"]["perplexity"] == pytest.approx(metrics["hf"]["perplexity"], rel=1e-3)
    assert metrics["engine_over_hf"]["perplexity"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_adapter_reaches_both_sides(tiny, engines, tmp_path):
    """--lora_dir B --lora_task_uids 0: the engine loads B with add_lora (after its built-in adapter A, so
    B's engine task id is 1), transformers merges B with peft; both sides then agree, and differ from the
    base model."""
    from trtbuild.convert.lora import make_peft_adapter

    model, _, data = tiny
    a = make_peft_adapter(model, tmp_path / "adapter_a", r=4, seed=1)
    b = make_peft_adapter(model, tmp_path / "adapter_b", r=4, seed=2)
    build_engine(engines.checkpoint(model), tmp_path / "engine",
                 BuildConfig(**LIMITS, lora_config=LoraConfig(lora_dir=(str(a),))), progress=False)
    common = ["--engine_dir", tmp_path / "engine", "--hf_model_dir", model, "--dataset_file", data,
              "--batch_size", 2, "--max_ite", 2, "--max_input_length", 32, "--output_len", 6, "--eval_ppl",
              "--num_threads", 1, "--no_progress"]
    assert run_summarize([*common, "--output_dir", tmp_path / "base"]) == 0
    assert run_summarize([*common, "--lora_dir", b, "--lora_task_uids", 0, "--output_dir", tmp_path / "b"]) == 0
    base = json.loads((tmp_path / "base" / "metrics.json").read_text())
    with_b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert with_b["engine"]["perplexity"] == pytest.approx(with_b["hf"]["perplexity"], rel=1e-4)
    assert with_b["engine"]["perplexity"] != pytest.approx(base["engine"]["perplexity"], rel=1e-3)
    # the engine's own adapter A (task id 0) without --lora_dir: transformers cannot know it
    assert run_summarize([*common, "--lora_task_uids", 0, "--test_trt_llm", "--output_dir", tmp_path / "a"]) == 0
    with_a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert with_a["engine"]["perplexity"] not in (base["engine"]["perplexity"], with_b["engine"]["perplexity"])
