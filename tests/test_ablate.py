"""The ablation command: a 2-run grid through the same train function writes its CSV, Markdown and plot."""

import csv

from opd_mini.ablate import main


def test_ablation_grid_writes_table_and_plot(tiny_model_dir, tiny_student_dir, tmp_path, capsys):
    out = tmp_path / "ablation"
    argv = ["--student", str(tiny_student_dir), "--teacher", str(tiny_model_dir), "--device", "cpu",
            "--losses", "reverse_kl_sampled,sft", "--seeds", "0", "--steps", "2", "--eval_every", "1",
            "--prompts_per_step", "2", "--max_new_tokens", "4", "--eval_prompts", "2", "--eval_samples", "2",
            "--pass_k", "2", "--progress", "false", "--lora", "false", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["loss"], r["seed"]) for r in rows] == [("reverse_kl_sampled", "0"), ("sft", "0")]
    assert all(0.0 <= float(r["eval/pass@1"]) <= 1.0 and r["steps"] == "2" for r in rows)
    md = (out / "results.md").read_text()
    assert "| reverse_kl_sampled |" in md and "| sft |" in md and "±" in md
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "runs" / "sft_seed0" / "metrics.jsonl").is_file()
    assert "results.md" in capsys.readouterr().out


def test_ablation_rejects_unknown_loss(tmp_path, capsys):
    assert main(["--losses", "reverse_kl_sampled,not_a_loss", "--out", str(tmp_path)]) == 2
    assert "not_a_loss" in capsys.readouterr().err
