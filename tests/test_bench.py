"""``bnlab bench`` (bnlab.bench.main) in a tiny configuration: the table is written into the
Markdown file's own section, other sections are kept. No timing is asserted."""

from __future__ import annotations

from bnlab.bench import main


def test_bench_writes_its_section_and_keeps_others(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    out.write_text("## Other section\n\nkept\n\n## Fused kernels\n\nold table\n")
    argv = ["--shapes", "mnist mlp (batch 60)", "--repeats", "1", "--no-compile", "--no-resnet"]
    assert main([*argv, "--cold", "--write", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("## Other section\n\nkept\n")
    assert "old table" not in text and text.count("## Fused kernels") == 1
    for mode in ("fwd", "fwd+bwd", "eval"):
        assert f"| mnist mlp (batch 60) (60, 100) | {mode} |" in text
    assert "cold caches" in text
    assert "torch threads" in capsys.readouterr().out


def test_cold_rounds_flush_before_every_timed_call_only():
    """``before`` (``--cold``'s cache flush) runs once before each timed call and not in the
    warm-up rounds."""
    from bnlab.bench import _interleaved

    events = []
    runs = {k: (lambda k=k: events.append(k)) for k in ("a", "b", "c")}
    times = _interleaved(runs, repeats=4, warmup=2, before=lambda: events.append("flush"))
    assert set(times) == {"a", "b", "c"}
    warm, timed = events[: 2 * len(runs)], events[2 * len(runs) :]
    assert "flush" not in warm
    assert timed[0::2] == ["flush"] * 12 and sorted(timed[1::2]) == sorted(["a", "b", "c"] * 4)
