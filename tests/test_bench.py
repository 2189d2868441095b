"""``bnlab bench`` (bnlab.bench.main) in a tiny configuration: the table is written into the
Markdown file's own section, other sections are kept. No timing is asserted."""

from __future__ import annotations

from bnlab.bench import main


def test_bench_writes_its_section_and_keeps_others(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    out.write_text("## Other section\n\nkept\n\n## Fused kernels\n\nold table\n")
    argv = ["--shapes", "mnist mlp (batch 60)", "--repeats", "1", "--no-compile", "--no-resnet"]
    assert main([*argv, "--write", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("## Other section\n\nkept\n")
    assert "old table" not in text and text.count("## Fused kernels") == 1
    for mode in ("fwd", "fwd+bwd", "eval"):
        assert f"| mnist mlp (batch 60) (60, 100) | {mode} |" in text
    assert "torch threads" in capsys.readouterr().out
