"""The transformer experiments: each asks one question of the training loop on tiny offline worlds.

    python -m opd_mini.experiments              # lists them
    python -m opd_mini.experiments NAME [--quick] [--seeds 0,1,2] [--out DIR] ...

The library (``opd_mini``) never imports this package. Each experiment is one module that follows the
template of :mod:`opd_mini.experiments.toolkit`; :mod:`~opd_mini.experiments.worlds` builds the tiny
teachers and students they start from (committed under ``assets/worlds``, rebuildable by one command).
"""

#: name -> (module, one line on what it asks)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "demo": ("opd_mini.experiments.demo", "why OPD learns fast, or does not: four settings × SFT, OPD variants, GRPO"),
    "slips": ("opd_mini.experiments.slips", "compounding errors on a slippery route: K waypoints × slip rate, BC, "
              "DART, OPD, GRPO (where on-policy data pays, and where it does not)"),
    "plateau": ("opd_mini.experiments.plateau", "the blog's protocol: from a student SFT has brought to a plateau, "
                "the sequences SFT, OPD and GRPO need to close the rest of the gap, and SFT's data-scaling fit"),
    "hidden": ("opd_mini.experiments.hidden", "a student above its teacher: a teacher noisy behind a flag the student "
               "cannot see (geometric against arithmetic mean)"),
    "shortcuts": ("opd_mini.experiments.shortcuts", "two cheap versions of OPD: distil only a prefix of each completion "
                  "(--prefix_fraction), or train on one prompt (--train_prompts 1)"),
    "special": ("opd_mini.experiments.special", "Fu et al.'s special-token masking, measured: sampled-token OPD with and "
                "without --mask_special_tokens, and the share of the update on those tokens"),
    "topk": ("opd_mini.experiments.topk", "top-K as Fu et al. run it: top-p rollouts × K × sampled-token, renormalised "
             "top-K and top-K with a tail bucket"),
    "passk": ("opd_mini.experiments.passk", "pass@k to k = 64 on the transformer worlds: does GRPO sharpen, does OPD "
              "keep its teacher's coverage?"),
    "along": ("opd_mini.experiments.along", "the teacher along the sequence: the gap log π − log q and the teacher's "
              "success-to-go from the student's prefixes, against position; does clipping or top-K flatten its pull "
              "(--parts gap,train)"),
    "forgetting": ("opd_mini.experiments.forgetting", "self-distillation: SFT on the model's own samples drifts, "
                   "OPD stays put"),
    "retention": ("opd_mini.experiments.retention", "learning a new skill: the old one forgotten at matched "
                  "success, then recovered (--parts retention,recovery)"),
    "sdft": ("opd_mini.experiments.sdft", "forgetting with a teacher close to the student: the start model behind a "
             "privileged prompt against SFT and an external expert, KL(π₀ ‖ π) on the new task"),
    "experts": ("opd_mini.experiments.experts", "two experts distilled into one student, against SFT and one "
                "teacher each"),
    "opsd": ("opd_mini.experiments.opsd", "the student's own base behind a privileged prompt as the teacher"),
    "fidelity": ("opd_mini.experiments.fidelity", "8-bit and 4-bit teachers against full precision, and their "
                 "students"),
    "real": ("opd_mini.experiments.real", "the same loop on a real pretrained model (SmolLM2-135M-Instruct): quantized "
             "teachers' fidelity, self-distillation"),
    "worlds": ("opd_mini.experiments.worlds", "build (or find) the tiny teachers and students the experiments start "
               "from (--write-assets)"),
}
