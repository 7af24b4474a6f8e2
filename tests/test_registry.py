"""The loss registry and the package's module boundaries.

* A loss defined outside the package (a user script) trains through the command line and the Python API,
  with one function and one ``register`` call; an unknown name is a clear error listing the known ones.
* Every built-in registered loss computes exactly what its function in ``opd_mini.losses`` computes with
  the options it documents, so the registry adds no maths of its own.
* The import graph of ``opd_mini`` has no cycle, counting imports inside functions too, and no module
  imports another's private name.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from opd_mini import losses, registry
from opd_mini.batch import Batch
from opd_mini.config import TrainConfig
from opd_mini.cli import parse_args
from helpers import loop_args, read_log
from opd_mini.train import main, train

PACKAGE = Path(losses.__file__).parent

PLUGIN = textwrap.dedent('''
    """A user's loss, outside the package: a fixed mixture of the two KL directions."""
    from opd_mini import losses, registry


    @registry.register("mixed_kl_plugin", kind="distribution", signal="full")
    def mixed_kl(student_logits_BTV, batch, opts):
        """(1 − α) KL(π_θ ‖ q) + α KL(q ‖ π_θ) at every visited prefix (opts.extra['alpha'])."""
        alpha = opts.extra.get("alpha", 0.5)
        rev, m_rev = losses.reverse_kl_full(student_logits_BTV, batch.teacher_logp_BTV, batch.mask_BT,
                                            num_tokens=batch.num_tokens)
        fwd, m_fwd = losses.forward_kl_full(student_logits_BTV, batch.teacher_logp_BTV, batch.mask_BT,
                                            num_tokens=batch.num_tokens)
        loss = (1 - alpha) * rev + alpha * fwd
        return loss, {**m_rev, **m_fwd, "loss/total": loss.detach()}
''')


@pytest.fixture
def clean_registry():
    """Leave the registry as it was (user losses registered by a test are removed afterwards)."""
    before = dict(registry.LOSS_REGISTRY)
    modules = set(sys.modules)
    yield
    registry.LOSS_REGISTRY.clear()
    registry.LOSS_REGISTRY.update(before)
    for name in set(sys.modules) - modules:
        if name.startswith("opd_mini_plugin_"):
            del sys.modules[name]


def test_a_user_loss_trains_through_the_command_line(tiny_student_dir, tiny_model_dir, tmp_path, clean_registry,
                                                     capsys):
    plugin = tmp_path / "my_losses.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "cli"
    args = loop_args(tiny_student_dir, tiny_model_dir, out, loss_plugins=plugin, loss="mixed_kl_plugin",
                    loss_args="alpha=0.25", loss_chunk_size=2)
    assert main(args) == 0
    rows = read_log(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:  # the plugin's value: (1 − α)·reverse + α·forward, summed over chunks
        assert row["loss/total"] == pytest.approx(0.75 * row["kl/reverse_full"] + 0.25 * row["kl/forward_full"],
                                                  rel=1e-4)
    saved = json.loads((out / "summary.json").read_text())["config"]
    assert (saved["loss"], saved["loss_args"]) == ("mixed_kl_plugin", "alpha=0.25")
    # --help lists the plugin's loss among the choices when the plugin is named
    with pytest.raises(SystemExit):
        parse_args(["--loss_plugins", str(plugin), "--help"])
    assert "mixed_kl_plugin" in capsys.readouterr().out


def test_a_user_loss_trains_in_a_fresh_process(tiny_student_dir, tiny_model_dir, tmp_path):
    """`python -m opd_mini.train --loss_plugins FILE --loss NAME`, as a user types it."""
    plugin = tmp_path / "my_losses.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "proc"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "opd_mini.train", *loop_args(
        tiny_student_dir, tiny_model_dir, out, steps=1, loss_plugins=plugin, loss="mixed_kl_plugin")],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kl/forward_full" in read_log(out)[-1]


def test_a_user_loss_trains_through_the_python_api(tiny_student_dir, tiny_model_dir, tmp_path, clean_registry):
    calls = []

    @registry.register("half_sampled_kl", kind="token", signal="sampled")
    def half_sampled_kl(student_logp_BT, batch, opts):
        """Half the sampled-token reverse KL (a token loss: it sees log π_θ(y_t) only)."""
        calls.append(student_logp_BT.shape)
        loss, metrics = losses.reverse_kl_sampled_token(student_logp_BT, batch.teacher_logp_BT, batch.mask_BT,
                                                        behaviour_logp_BT=batch.behaviour_logp_BT,
                                                        num_tokens=batch.num_tokens)
        return 0.5 * loss, {**metrics, "loss/total": 0.5 * loss.detach()}

    cfg = TrainConfig(student=tiny_student_dir, teacher=tiny_model_dir, loss="half_sampled_kl", device="cpu",
                      dtype="float32", steps=2, prompts_per_step=2, num_generations=2, max_new_tokens=4,
                      eval_prompts=2, eval_samples=1, pass_k=1, lora=False, progress=False,
                      out_dir=str(tmp_path / "api"))
    summary = train(cfg)
    assert summary["steps_done"] == 2 and len(calls) == 2 and calls[0][0] == 4  # 2 prompts × 2 samples
    rows = read_log(tmp_path / "api")[1:]
    assert all("kl/reverse_sampled" in r for r in rows)


def test_an_unknown_loss_is_a_clear_error_listing_the_known_ones(tmp_path, capsys):
    with pytest.raises(ValueError) as err:
        TrainConfig(loss="not_a_loss")
    assert "not_a_loss" in str(err.value) and all(name in str(err.value) for name in registry.LOSS_REGISTRY)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--loss", "not_a_loss"])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "not_a_loss" in message and "reverse_kl_topk" in message
    with pytest.raises(ValueError, match="already registered"):
        registry.register("sft", kind="token", signal=None)(lambda logp_BT, batch, opts: None)
    with pytest.raises(ValueError, match="does not exist"):
        TrainConfig(loss_plugins=str(tmp_path / "missing.py"))
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig(loss_args="alpha")


def _random_batch(B=3, T=4, V=6, K=3, seed=0) -> tuple[torch.Tensor, Batch]:
    g = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(B, T, V, generator=g)
    teacher_logits = torch.randn(B, T, V, generator=g) * 2
    tokens = torch.randint(V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    batch = Batch.from_teacher_logits(tokens, teacher_logits, signal="full", mask_BT=mask,
                                                 behaviour_logp_BT=torch.randn(B, T, generator=g) - 2,
                                                 rewards_B=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0][:B * 2][:B]),
                                                 group_size=B, num_tokens=7)
    logq = batch.teacher_logp_BTV
    batch.teacher_topk_logp_BTK, batch.teacher_topk_ids_BTK = logq.topk(K, dim=-1)
    return student_logits, batch


def test_built_in_registered_losses_are_their_functions(clean_registry):
    """Each registered wrapper forwards the options it documents; the registry adds no maths."""
    z, b = _random_batch()
    o = registry.LossOptions(gamma=0.5, clip_log_ratio=2.0, beta=0.3, top_k=3, add_sampled_token=True,
                           renormalize=True, entropy_threshold=0.7, reward_weight=0.4, grpo_normalize_std=False)
    logp = losses.token_logprobs(z, b.tokens_BT)
    L, n = losses, b.num_tokens
    direct = {
        "reverse_kl_sampled": L.reverse_kl_sampled_token(logp, b.teacher_logp_BT, b.mask_BT, gamma=0.5, clip_log_ratio=2.0,
                                                         behaviour_logp_BT=b.behaviour_logp_BT, num_tokens=n),
        "reverse_kl_full": L.reverse_kl_full(z, b.teacher_logp_BTV, b.mask_BT, num_tokens=n),
        "forward_kl": L.forward_kl_full(z, b.teacher_logp_BTV, b.mask_BT, num_tokens=n),
        "jsd": L.generalized_jsd(z, b.teacher_logp_BTV, b.mask_BT, beta=0.3, num_tokens=n),
        "reverse_kl_topk": L.reverse_kl_topk(z, b.teacher_topk_ids_BTK, b.teacher_topk_logp_BTK, b.mask_BT,
                                             sampled_ids_BT=b.tokens_BT, teacher_sampled_logp_BT=b.teacher_logp_BT,
                                             num_tokens=n),
        "reverse_kl_topk_tail": L.reverse_kl_topk(z, b.teacher_topk_ids_BTK, b.teacher_topk_logp_BTK, b.mask_BT,
                                                  sampled_ids_BT=b.tokens_BT, teacher_sampled_logp_BT=b.teacher_logp_BT,
                                                  renormalize=False, tail=True, num_tokens=n),
        "entropy_aware": L.entropy_aware_kl(z, b.teacher_logp_BTV, b.mask_BT, entropy_threshold=0.7, num_tokens=n),
        "supervised_kd": L.forward_kl_full(z, b.teacher_logp_BTV, b.mask_BT, num_tokens=n),
        "sft": L.sft_cross_entropy(logp, b.mask_BT, num_tokens=n),
        "grpo": L.policy_gradient(logp, L.grpo_advantages(b.rewards_B, 3, normalize_std=False), b.mask_BT,
                                  behaviour_logp_BT=b.behaviour_logp_BT, num_tokens=n),
    }
    # opd_grpo: A_t = −RTG_γ(clip(r_t)) + w·A^reward with r_t from the behaviour log-probs
    r = (b.behaviour_logp_BT - b.teacher_logp_BT).clamp(-2.0, 2.0)
    adv = -L.return_to_go(r, b.mask_BT, 0.5) + 0.4 * L.grpo_advantages(b.rewards_B, 3, normalize_std=False)[:, None]
    direct["opd_grpo"] = L.policy_gradient(logp, adv, b.mask_BT, behaviour_logp_BT=b.behaviour_logp_BT, num_tokens=n)
    built_in = {name for name, spec in registry.LOSS_REGISTRY.items() if spec.fn.__module__ == "opd_mini.registry"}
    assert set(direct) == built_in, "a built-in loss has no reference here"
    for name, (want, _) in direct.items():
        got, metrics = registry.compute_loss(name, z, b, o)
        assert torch.equal(got, want), name
        assert "loss/total" in metrics and set(metrics) <= set(losses.METRIC_DOCS), name
    # the signal each loss declares is enough: a batch holding only that signal gives the same value
    for name, spec in registry.LOSS_REGISTRY.items():
        if spec.signal is None:
            continue
        lean = dataclasses.replace(b, teacher_logp_BTV=b.teacher_logp_BTV if spec.signal == "full" else None,
                                   teacher_topk_ids_BTK=b.teacher_topk_ids_BTK if spec.signal == "topk" else None,
                                   teacher_topk_logp_BTK=b.teacher_topk_logp_BTK if spec.signal == "topk" else None)
        assert torch.equal(registry.compute_loss(name, z, lean, o)[0], direct[name][0]), name


def test_distribution_losses_are_separable_along_T():
    """The loop may compute a distribution loss chunk by chunk (Batch.slice_T): the pieces add up."""
    z, b = _random_batch(T=5)
    o = registry.LossOptions(top_k=3)
    for name, spec in registry.LOSS_REGISTRY.items():
        if spec.kind != "distribution":
            continue
        whole = registry.compute_loss(name, z, b, o)[0]
        pieces = sum(registry.compute_loss(name, z[:, s], b.slice_T(s), o)[0] for s in (slice(0, 2), slice(2, 5)))
        torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=1e-7, msg=name)


def test_each_loss_option_is_declared_once_and_the_config_inherits_it():
    """A loss hyperparameter is declared in LossOptions alone (default, help, range); TrainConfig inherits the very
    same field, so its flag, help text and range come from that one declaration."""
    import inspect

    config_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(registry.LossOptions):
        assert config_fields[f.name] is f, f.name  # the same Field object, not a copy
        assert f.metadata["help"], f.name
    source = inspect.getsource(TrainConfig)
    assert not [f.name for f in dataclasses.fields(registry.LossOptions) if f"    {f.name}:" in source]
    assert registry.LossOptions.from_config(TrainConfig(beta=0.2, loss_args="alpha=3,tag=x")) == registry.LossOptions(
        beta=0.2, loss_args="alpha=3,tag=x")
    assert registry.LossOptions(loss_args="alpha=3,tag=x").extra == {"alpha": 3.0, "tag": "x"}
    with pytest.raises(ValueError, match="top_k=1 is out of range"):
        registry.LossOptions(top_k=1)


def test_loss_args_cannot_set_a_built_in_option():
    """--loss jsd --loss_args beta=0.0 would train at the default β: refused, naming the flag to use."""
    with pytest.raises(ValueError, match="sets beta, a built-in option.*use --beta 0.0"):
        TrainConfig(loss="jsd", loss_args="beta=0.0")


# ---------------------------------------------------------------------------------------------
# module boundaries
# ---------------------------------------------------------------------------------------------


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(opd_mini module imported, names taken from it, line) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("opd_mini.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a.name for a in node.names]
            if node.module == "opd_mini":  # from opd_mini import losses, sampler
                found += [(f"opd_mini.{n}", [], node.lineno) for n in names if (PACKAGE / f"{n}.py").exists()]
            elif node.module.startswith("opd_mini."):
                found.append((node.module, names, node.lineno))
    return found


def test_import_graph_has_no_cycle_and_no_private_imports():
    graph, private = {}, []
    for path in sorted(PACKAGE.glob("*.py")):
        module = f"opd_mini.{path.stem}"
        graph[module] = set()
        for target, names, line in _imports(path):
            if target != module:
                graph[module].add(target)
            private += [f"{path.name}:{line} imports {target}.{n}" for n in names if n.startswith("_")]
    assert not private, private

    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # the layering the package promises: {divergences, advantages} → losses → batch → registry → forward → {sampler, student, teacher}
    # → rollouts → train, and only the command built on the loop (ablate) imports train
    assert graph["opd_mini.divergences"] == graph["opd_mini.tensors"] == graph["opd_mini.options"] == set()
    assert graph["opd_mini.advantages"] == {"opd_mini.tensors"}
    assert graph["opd_mini.losses"] == {"opd_mini.advantages", "opd_mini.divergences", "opd_mini.tensors"}
    assert graph["opd_mini.batch"] == {"opd_mini.losses"}
    assert graph["opd_mini.registry"] == {"opd_mini.losses", "opd_mini.batch", "opd_mini.options"}
    assert graph["opd_mini.forward"] <= {"opd_mini.losses", "opd_mini.batch"}
    for name in ("sampler", "student", "teacher"):
        assert "opd_mini.forward" in graph[f"opd_mini.{name}"]
        assert not graph[f"opd_mini.{name}"] & {"opd_mini.sampler", "opd_mini.student", "opd_mini.teacher"}, name
    commands = {"opd_mini.ablate"}
    assert {name for name, deps in graph.items() if "opd_mini.train" in deps} <= commands
