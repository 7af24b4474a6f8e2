"""Every option takes effect or is refused: each pair of the loop's newer options, from one table.

:data:`OPTIONS` gives each option its flags and a *probe*: a check, on a run's log, summary and what the
loop was seen doing, that the option did what it says (a teacher really quantized, the template really
read by the teacher, the pool really drawn from, ...). For every pair of options the test runs the loop
with both (2 steps on the tiny pair) and checks both probes, unless the pair is in :data:`REFUSED`, where
it checks the one-line refusal (exit code 2, nothing written). A new option joins by one line in OPTIONS.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest

from tests.helpers import loop_args, read_log

TEMPLATE = "{prompt} (the answer is {answer})"
BNB = importlib.util.find_spec("bitsandbytes") is not None

PLUGIN = '''
from opd_mini import losses, registry

SEEN = []


@registry.register("probe_kl", kind="distribution", signal="full")
def probe_kl(student_logits_BTV, batch, opts):
    """Reverse KL over the vocabulary; records the options it was given."""
    SEEN.append(opts.extra.get("alpha"))
    return losses.reverse_kl_full(student_logits_BTV, batch.teacher_logp_BTV, batch.mask_BT, num_tokens=batch.num_tokens)
'''


class Seen:
    """What the loop did during one run: the teacher's prompts, the samplers used, who sampled, backward calls."""

    def __init__(self):
        self.teacher_prompts, self.methods, self.by_teacher, self.backwards = [], [], [], 0
        self.scorers = []  # each scoring call: (the model has trainable weights, its adapter disabled)
        self.slips, self.exact = [], []  # each training draw's slip; whether it drew a KL estimate's samples
        self.eval_slips, self.eval_methods = [], []  # the slip and the sampler of each draw of the evaluation
        self.tokens, self.eval_tokens = [], []  # max_new_tokens of each training (or KL estimate's) and evaluation draw
        self.batch_prompts = []  # the prompts of each sample_batch call (beside self.exact)


def _probe_teachers(run):
    assert set(run.summary["ran"]["teachers"]) == {"reverse:3", "add:1"}
    assert run.summary["ran"]["teachers"]["add:1"]["student_base"]
    assert {"reward/mean/reverse:3", "reward/mean/add:1"} <= set(run.rows[1])


def _probe_mixture(run):
    assert {"reward/mean/reverse:3", "reward/mean/add:1"} <= set(run.rows[1])
    assert {"eval/pass@1/reverse:3", "eval/pass@1/add:1"} <= set(run.rows[0])


def _probe_template(run):
    assert run.seen.teacher_prompts and all("(the answer is " in p for p in run.seen.teacher_prompts)


def _probe_quant4(run):
    assert {t["quantization"] for t in run.summary["ran"]["teachers"].values()} == {"4bit"}


def _probe_init_adapter(run):
    assert run.summary["ran"]["adapter"]["r"] == 4 and run.summary["config"]["lora_r"] == 4


def _probe_lmbda(run):
    steps = [r for r in run.rows if "optim/grad_norm" in r]
    assert [r["rollout/on_policy"] for r in steps] == [0.0] * len(steps)
    assert all(run.seen.by_teacher)


def _probe_pool(run):
    assert run.seen.by_teacher.count(True) == 1  # drawn once, at the start; the steps take their prompts from it


def _probe_plugin(run):
    assert run.summary["ran"]["loss"]["name"] == "probe_kl" and run.summary["ran"]["loss"]["file"].endswith("probe.py")
    import sys

    seen = [m for name, m in sys.modules.items() if name.startswith("opd_mini_plugin_probe")][0].SEEN
    assert seen and set(seen) == {0.25}


def _probe_decode(run):
    used = run.seen.methods + run.seen.eval_methods  # training draws (none with reference answers), evaluation's
    assert run.seen.eval_methods and set(used) == {"decode"}


def _probe_kl_forward(run):
    assert "eval/kl_forward" in run.rows[0] and run.rows[0]["eval/kl_forward"] != 0.0


def _probe_kl_to_init(run):
    assert run.rows[0]["eval/retention_kl_to_init"] == 0.0 and "eval/retention_kl_to_init" in run.rows[-1]
    assert run.rows[0]["eval/kl_to_init"] == 0.0 and "eval/kl_to_init" in run.rows[-1]  # the trained task's prompts


def _probe_moving(run):
    assert run.summary["ran"]["teachers"]["*"] == {"path": "student", "student_base": False, "quantization": "none"}
    assert run.seen.scorers and all(trainable and not off for trainable, off in run.seen.scorers)  # the student, adapter on
    assert all("(the answer is " in p for p in run.seen.teacher_prompts)


def _probe_answers(run):
    assert run.summary["ran"]["teachers"]["*"]["path"] == "answers" and run.summary["ran"]["loss"]["name"] == "sft"
    steps = [r for r in run.rows if "optim/grad_norm" in r]
    assert steps and all(r["reward/mean"] == 1.0 for r in steps)  # trained on the reference answers: all correct


def _probe_slip(run):
    assert run.summary["ran"]["slip"] == {"prob": 0.9, "moves": ["L", "R"], "training_rollouts": True}
    assert len(run.seen.slips) == len(run.seen.exact) and not all(run.seen.exact)
    for slip, exact in zip(run.seen.slips, run.seen.exact):  # every training draw slips, no KL estimate's draw does
        assert (slip is None) if exact else (slip.prob == 0.9)
    assert any(s is not None and s.prob == 0.9 for s in run.seen.eval_slips)  # the evaluation slips too


def _probe_prefix(run):
    assert run.summary["ran"]["prefix_tokens"] == 3  # ceil(0.5 × 5)
    assert len(run.seen.tokens) == len(run.seen.exact) and not all(run.seen.exact)
    for tokens, exact in zip(run.seen.tokens, run.seen.exact):  # training draws stop at the prefix; KL estimates do not
        assert tokens == (5 if exact else 3)
    assert run.seen.eval_tokens and set(run.seen.eval_tokens) == {5}  # the evaluation samples whole completions


def _probe_one_prompt(run):
    fixed = run.summary["ran"]["train_prompts"]
    drawn = {p for prompts, exact in zip(run.seen.batch_prompts, run.seen.exact) if not exact for p in prompts}
    assert len(fixed) == 1 and drawn == set(fixed)


def _probe_grad_accum(run):
    assert run.seen.backwards >= 2 * 2  # two micro-batches (or more, one per task) in each of the two steps


#: name -> (flags, probe). Every run also has the base flags of _run (a LoRA student, the jsd loss).
OPTIONS = {
    "teachers": (dict(task="reverse:3+add:1", teachers="reverse:3={T};add:1=self"), _probe_teachers),
    "mixture": (dict(task="reverse:3+add:1"), _probe_mixture),
    "template": (dict(teacher_template=TEMPLATE), _probe_template),
    "quant4": (dict(teacher_quantization="4bit"), _probe_quant4),
    "init_adapter": (dict(init_adapter="{ADAPTER}"), _probe_init_adapter),
    "lmbda": (dict(lmbda=0.0), _probe_lmbda),
    "pool": (dict(teacher_sample_pool=4, lmbda=0.0), _probe_pool),
    "moving": (dict(teacher="student", teacher_template=TEMPLATE), _probe_moving),
    "answers": (dict(teacher="answers", loss="sft"), _probe_answers),  # before plugin: its loss would win
    "plugin": (dict(loss_plugins="{PLUGIN}", loss="probe_kl", loss_args="alpha=0.25"), _probe_plugin),
    "decode": (dict(sampler="decode"), _probe_decode),
    "kl_forward": (dict(eval_kl_forward="true"), _probe_kl_forward),
    "kl_to_init": (dict(eval_kl_to_init="true", retention_task="add:2"), _probe_kl_to_init),
    "grad_accum": (dict(grad_accum=2), _probe_grad_accum),
    "slip": (dict(task="walk:10", slip_prob=0.9), _probe_slip),
    "prefix": (dict(prefix_fraction=0.5), _probe_prefix),
    "one_prompt": (dict(train_prompts=1), _probe_one_prompt),
}

#: Pairs refused in one line, and the message.
REFUSED = {
    frozenset({"teachers", "quant4"}): "does not apply to --teachers",
    frozenset({"pool", "teachers"}): "not supported with a mixture",
    frozenset({"pool", "mixture"}): "not supported with a mixture",
    frozenset({"slip", "mixture"}): "no moves that can slip",
    frozenset({"slip", "teachers"}): "no moves that can slip",
    frozenset({"moving", "teachers"}): "cannot be quantized or combined with --teachers",
    frozenset({"moving", "quant4"}): "cannot be quantized or combined with --teachers",
    frozenset({"moving", "answers"}): "does not apply to teacher='answers'",
    frozenset({"answers", "teachers"}): "contradict each other",
    frozenset({"answers", "template"}): "does not apply to teacher='answers'",
    frozenset({"answers", "quant4"}): "does not apply to teacher='answers'",
    frozenset({"answers", "kl_forward"}): "does not apply to teacher='answers'",
    frozenset({"answers", "lmbda"}): "is not allowed with loss=sft",
    frozenset({"answers", "pool"}): "is not allowed with loss=sft",
    frozenset({"answers", "plugin"}): "use it with loss=sft",
    frozenset({"answers", "slip"}): "do not slip",
    frozenset({"prefix", "answers"}): "does not apply to teacher='answers'",
    frozenset({"one_prompt", "pool"}): "both fix the prompts",
    frozenset({"one_prompt", "mixture"}): "not supported with a mixture",
    frozenset({"one_prompt", "teachers"}): "not supported with a mixture",
}


def _pairs():
    names = [n for n in OPTIONS if n != "quant4" or BNB]
    return [(a,) for a in names] + list(itertools.combinations(names, 2))


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_student_dir, tiny_model_dir):
    """The plugin file and a saved LoRA adapter of rank 4 on the student."""
    from opd_mini import registry
    from opd_mini.student import load_student, save_student

    root = tmp_path_factory.mktemp("options")
    (root / "probe.py").write_text(PLUGIN)
    adapter = save_student(load_student(tiny_student_dir, lora=True, lora_r=4, lora_alpha=8.0), root / "adapter")
    yield {"PLUGIN": str(root / "probe.py"), "ADAPTER": str(adapter), "T": tiny_model_dir}
    registry.LOSS_REGISTRY.pop("probe_kl", None)  # the plugin's loss leaves the table as it found it


class Run:
    def __init__(self, rows, summary, seen):
        self.rows, self.summary, self.seen = rows, summary, seen


def _run(names, assets, student, teacher, out: Path, monkeypatch, capsys):
    from opd_mini import rollouts, train
    from opd_mini import sampler as sampler_module

    flags = dict(lora="true", loss="jsd", steps=2, eval_every=0, lr=1e-2)
    for name in names:
        for k, v in OPTIONS[name][0].items():
            for key, path in assets.items():  # {T}, {PLUGIN}, {ADAPTER}; a template's own fields stay
                v = v.replace("{" + key + "}", path) if isinstance(v, str) else v
            flags[k] = f"{flags[k]}+{v}" if k == "task" and flags.get(k, v) != v else v  # two tasks: their mixture
    seen = Seen()
    real_score, real_sample = rollouts.score, rollouts.sample
    real_sample_batch, real_backward = rollouts.sample_batch, train.loss_and_backward

    def score(model, batch, *, view=None, **kw):
        seen.teacher_prompts += (view or batch).prompt_texts
        seen.scorers.append((any(p.requires_grad for p in model.parameters()), kw.get("disable_adapter", False)))
        return real_score(model, batch, view=view, **kw)

    def sample(model, tokenizer, prompts, **kw):
        seen.methods.append(kw.get("method"))
        seen.slips.append(kw.get("slip"))
        seen.tokens.append(kw.get("max_new_tokens"))
        return real_sample(model, tokenizer, prompts, **kw)

    def sample_batch(*args, by_teacher, **kw):
        seen.by_teacher.append(by_teacher)
        seen.exact.append(kw.get("exact", False))
        seen.batch_prompts.append([e.prompt for e in args[2]])
        return real_sample_batch(*args, by_teacher=by_teacher, **kw)

    def backward(*args, **kw):
        seen.backwards += 1
        return real_backward(*args, **kw)

    def eval_sample(model, tokenizer, prompts, **kw):
        seen.eval_slips.append(kw.get("slip"))
        seen.eval_tokens.append(kw.get("max_new_tokens"))
        seen.eval_methods.append(kw.get("method"))
        return real_sample(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(sampler_module, "sample", eval_sample)  # what opd_mini.eval calls
    monkeypatch.setattr(rollouts, "score", score)
    monkeypatch.setattr(rollouts, "sample", sample)
    monkeypatch.setattr(rollouts, "sample_batch", sample_batch)
    def eval_sample_batch(*args, **kw):  # the evaluation's teacher samples (a KL estimate's)
        seen.exact.append(kw.get("exact", False))
        seen.batch_prompts.append([e.prompt for e in args[2]])
        return real_sample_batch(*args, **kw)

    monkeypatch.setattr(train, "sample_batch", eval_sample_batch)
    monkeypatch.setattr(train, "loss_and_backward", backward)
    code = train.main(loop_args(student, flags.pop("teacher", teacher), out, **flags))
    return code, capsys.readouterr().err, seen


@pytest.mark.parametrize("names", _pairs(), ids=lambda n: "+".join(n))
def test_each_option_takes_effect_alone_and_with_every_other_or_is_refused(names, assets, tiny_student_dir,
                                                                            tiny_model_dir, tmp_path, monkeypatch,
                                                                            capsys):
    out = tmp_path / "run"
    code, err, seen = _run(names, assets, tiny_student_dir, tiny_model_dir, out, monkeypatch, capsys)
    refused = REFUSED.get(frozenset(names))
    if refused:
        lines = [line for line in err.strip().splitlines() if line.startswith("error")]
        assert code == 2 and len(lines) == 1 and refused in lines[0], err[-800:]
        assert not (out / "metrics.jsonl").exists()
        return
    assert code == 0, err[-1500:]
    run = Run(read_log(out), json.loads((out / "summary.json").read_text()), seen)
    for name in names:
        OPTIONS[name][1](run)
