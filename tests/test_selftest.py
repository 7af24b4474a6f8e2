"""``python -m opd_mini.selftest``: every registered loss at π = q, and a loss that is not 0 there is caught."""

import subprocess
import sys
from pathlib import Path

from opd_mini import selftest

ROOT = Path(__file__).resolve().parents[1]


def test_every_built_in_loss_passes_at_pi_equals_q():
    from opd_mini import registry

    built_in = [n for n, spec in registry.LOSS_REGISTRY.items() if spec.fn.__module__ == "opd_mini.registry"]
    rows = {r["loss"]: r for r in selftest.run(names=built_in)}  # not the losses other tests may have registered
    assert len(rows) >= 11
    assert all(r["ok"] for r in rows.values()), [r for r in rows.values() if not r["ok"]]
    assert rows["reverse_kl_full"]["value"] == 0.0 and rows["sft"]["value"] > 0.5  # sft: its own cross-entropy


def _selftest(plugin):
    return subprocess.run([sys.executable, "-m", "opd_mini.selftest", "--loss_plugins", str(plugin)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_a_plugin_loss_that_is_not_zero_at_pi_equals_q_fails_the_command(tmp_path):
    plugin = tmp_path / "bad_loss.py"
    plugin.write_text(
        "from opd_mini.registry import register\n"
        "@register('off_by_one', kind='distribution', signal='full')\n"
        "def off_by_one(z, b, o):\n"
        "    loss = (z.float().logsumexp(-1) - b.teacher_logp_BTV.logsumexp(-1))[b.mask_BT].mean() + 1.0\n"
        "    return loss, {'loss/total': loss.detach()}\n")
    out = _selftest(plugin)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "| off_by_one |" in out.stdout and "NO |" in out.stdout and "failing: off_by_one" in out.stdout
    plugin.write_text(  # a loss that is not a scalar: a failing row that says why, not a traceback
        "from opd_mini.registry import register\n"
        "@register('per_token', kind='distribution', signal='full')\n"
        "def per_token(z, b, o):\n"
        "    return z.float().logsumexp(-1), {}\n")
    out = _selftest(plugin)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "| per_token |" in out.stdout and "raised" in out.stdout and "failing: per_token" in out.stdout
    missing = _selftest(tmp_path / "nope.py")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "error:" in missing.stderr
