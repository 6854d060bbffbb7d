"""Every editor checks every constructor argument when it is built, before any model is touched:
a bad value raises :class:`~editlab.errors.SettingError` (a ``ValueError``) named by the argument.

The table below holds, per editor and argument, values that must be refused; the coverage test
makes sure every argument of every editor has a row (or a reason in ``UNCHECKED``), so that a new
argument cannot go unchecked and removing a check fails its row.  Constructors only: no model.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import editlab.methods
from editlab.errors import SettingError
from editlab.methods.alphaedit import AlphaEdit
from editlab.methods.base import Editor
from editlab.methods.calinet import CaliNet
from editlab.methods.emmet import EMMET
from editlab.methods.ft import FTL
from editlab.methods.grace import GRACE
from editlab.methods.ike import IKE
from editlab.methods.ke import KE
from editlab.methods.keyvalue import KeyValueEditor
from editlab.methods.kn import KN
from editlab.methods.malmen import MALMEN
from editlab.methods.memit import MEMIT
from editlab.methods.mend import MEND
from editlab.methods.rledit import RLEdit
from editlab.methods.rome import ROME
from editlab.methods.serac import SERAC
from editlab.methods.t_patcher import TPatcher
from editlab.methods.wise import WISE
from editlab.methods.ultraedit import UltraEdit

NAN, INF = float("nan"), float("inf")

# The arguments an editor needs besides its defaults to be built at all.
REQUIRED = {IKE: {"train_data": ()}}  # k = 32 demonstrations need a training split

# Arguments without a row, each with the reason.  Empty: every argument is checked.
UNCHECKED: dict[tuple[type, str], str] = {}

# Editor classes that are bases of others, not editors of their own.
BASES = {Editor: "the interface, no arguments",
         KeyValueEditor: "the shared base of ROME and MEMIT; its arguments have rows under both"}

# ----------------------------------------------------------------------------- bad values
# (argument, bad value, other arguments the check needs)
KEY_VALUE = [  # ROME and MEMIT (KeyValueEditor)
    ("layers", []), ("layers", [-1]), ("layers", [1.5]), ("layers", [True]), ("layers", "17"), ("layers", 17),
    ("layers", [17, 17]),
    ("fact_token", "subject"), ("fact_token", None),
    ("v_num_grad_steps", 0), ("v_num_grad_steps", 2.5), ("v_num_grad_steps", 20.0), ("v_num_grad_steps", True),
    ("v_lr", 0), ("v_lr", -0.5), ("v_lr", "0.5"), ("v_lr", NAN),
    ("v_weight_decay", -0.1), ("v_weight_decay", None),
    ("clamp_norm_factor", 0), ("clamp_norm_factor", INF),
    ("kl_factor", -1.0), ("kl_factor", "0.0625"),
    ("kl_prompts", []), ("kl_prompts", "{} is a"), ("kl_prompts", ["is a"]), ("kl_prompts", [""]),
    ("early_stop_loss", None), ("early_stop_loss", -0.05),
    ("context_template_length_params", [[5]]), ("context_template_length_params", [[5, 0]]),
    ("context_template_length_params", [[5, 10.5]]), ("context_template_length_params", "5,10"),
    ("context_template_length_params", [5, 10]),
    ("template_prompts", []), ("template_prompts", "The"), ("template_prompts", [""]),
    ("template_seed", 0.5), ("template_seed", "0"),
    ("mom2_corpus", "wikipedia"),
    ("mom2_n_tokens", 0), ("mom2_n_tokens", 1e7),
    ("mom2_dtype", "float16"), ("mom2_dtype", None),
    ("stats_cache_dir", ""), ("stats_cache_dir", 3),
]
TRAINABLE = [  # MEND and KE (TrainableEditor), where the editor takes the argument
    ("edit_params", []), ("edit_params", "transformer.h.1.mlp.c_fc.weight"), ("edit_params", [""]),
    ("edit_params", [1]), ("edit_params", ["a.weight", "a.weight"]),
    ("c_edit", -0.1), ("c_edit", "0.1"), ("c_loc", -1.0), ("c_loc", None),
    ("edit_outer", "paraphrase"), ("loc_positions", "prompt"), ("loc_positions", None),
    ("batch_edits", "separate"),
    ("base_model", ""), ("base_model", 3),
]

TABLE: dict[type, list[tuple]] = {
    FTL: [
        ("layers", []), ("layers", [-1]), ("layers", [1.5]), ("layers", [True]), ("layers", "0"), ("layers", 0),
        ("layers", [1, 1]),
        ("module", "mlp"), ("module", "c_proj"),
        ("lr", 0), ("lr", -1.0), ("lr", "1e-3"), ("lr", True), ("lr", None), ("lr", NAN), ("lr", INF),
        ("num_steps", 0), ("num_steps", 2.5), ("num_steps", 25.0), ("num_steps", True),
        ("norm_constraint", 0), ("norm_constraint", -1e-3), ("norm_constraint", "5e-4"),
        ("objective", "nope"), ("objective", None),
        ("weight_decay", -0.1), ("weight_decay", None),
        ("early_stop_loss", None), ("early_stop_loss", -1.0), ("early_stop_loss", "0.01"),
        ("replay", 1), ("replay", "true"), ("replay", None),
    ],
    ROME: KEY_VALUE + [("mom2_adjustment", "yes"), ("mom2_adjustment", 1), ("r_rome", 1), ("r_rome", None)],
    MEMIT: KEY_VALUE + [
        ("mom2_update_weight", 0), ("mom2_update_weight", -1.0), ("mom2_update_weight", "2e4"),
        ("v_batch_requests", 0), ("v_batch_requests", 1.5),
    ],
    KN: [
        ("steps", 0), ("steps", 2.5), ("steps", True), ("batch_size", 0), ("batch_size", "20"),
        ("adaptive_threshold", -0.1), ("adaptive_threshold", 1.0), ("refine", 1), ("refine", "false"),
        ("p", 1.0), ("p", -0.1), ("old_scale", -1.0), ("old_scale", None), ("new_scale", -2.0),
        ("old_token", "nope"), ("riemann", "trapezoid"),
    ],
    MEND: TRAINABLE + [
        ("rank", 0), ("rank", 1920.0), ("n_hidden", -1), ("n_hidden", 1.5), ("init", "ortho"), ("act", "gelu"),
        ("norm", 1), ("combine", "true"), ("shared", None),
        ("one_sided", True), ("x_only", True), ("delta_only", True),  # need combine=False
        ("one_sided", 1, {"combine": False}), ("x_only", "yes", {"combine": False}),
        ("delta_only", True, {"combine": False, "x_only": True}),  # at most one of them
        ("edit_lr", 0), ("edit_lr", "1e-4"), ("lr_lr", -1.0),
    ],
    KE: [row for row in TRAINABLE if row[0] not in ("c_edit", "c_loc", "edit_outer")] + [
        ("hidden_dim", 0), ("hidden_dim", 1.5), ("condition_dim", 0), ("condition_dim", True),
        ("max_scale", 0), ("margin", -1e-3), ("margin", None), ("margin_min", -1.0), ("margin_min", "0"),
        ("margin_decay", 0), ("margin_decay", 1.5), ("anneal_threshold", 1.5), ("anneal_threshold", -0.1),
        ("lr_multiplier", 0), ("multiplier_init", -1.0), ("label_smoothing", 1.0), ("label_smoothing", -0.1),
    ],
    SERAC: [
        ("encoder", 3), ("encoder", ""), ("cross_attend", 1), ("cos", "no"),
        ("cos", True, {"cross_attend": True}),  # a distance of the embedding classifier only
        ("square", None), ("scale", 0), ("scale", -1.0), ("counterfactual", 3), ("counterfactual", ""),
        ("freeze_cntr", 1), ("freeze_cntr", True, {"counterfactual": "distilgpt2"}),
        ("c_edit", -0.1), ("c_loc", -1.0), ("use_all_negatives", 0), ("rephrase_negatives", "false"),
        ("threshold", 0), ("threshold", 1.0), ("edit_template", "{subject}"), ("edit_template", 3),
        ("prefix_template", "{}"), ("prefix_template", None), ("dropout", 1.0), ("dropout", -0.1),
        ("base_model", ""),
    ],
    IKE: [
        ("k", -1), ("k", 2.5), ("k", True), ("train_data", None), ("train_data", "train.json"), ("train_data", 5),
        ("encoder", 3), ("encoder", ""), ("demo_ratio", (1, 2)), ("demo_ratio", (0, 0, 0)),
        ("demo_ratio", (-1, 3, 4)), ("demo_ratio", "134"), ("demo_ratio", (1, "3", 4)), ("demo_ratio", (1, NAN, 4)),
        ("demo_format", "New Fact: {subject}"), ("demo_format", 3), ("fact_copy", 1),
        ("fact_format", "{prompt}"), ("query_format", "{x}"), ("query_format", None), ("seed", 1.5),
        ("cache_dir", ""), ("cache_dir", 3), ("encode_batch_size", 0), ("max_batch_tokens", 0),
        ("max_batch_tokens", 8192.0), ("text_join", "yes"),
    ],
    TPatcher: [
        ("layer", 1.5), ("layer", True), ("layer", "-1"), ("max_neurons_per_edit", 0), ("lr", 0), ("lr", "1e-2"),
        ("weight_decay", -0.01), ("max_steps", 0), ("max_steps", 2000.0), ("check_every", 0),
        ("early_stop_threshold", -1e-3), ("lr_decay_factor", 1.0), ("lr_decay_factor", 0),
        ("lr_decay_patience", -1), ("lr_decay_patience", 1.5), ("lr_decay_threshold", -0.05), ("grad_clip", 0),
        ("activation_coef", -1.0), ("activation_margin", NAN), ("activation_margin", "0"),
        ("activation_top_k", 0), ("memory_coef", -10.0), ("memory_margin_edit", None),
        ("memory_margin_silent", INF), ("memory_top_k", 0), ("value_amplify", 0), ("value_amplify", -10.0),
        ("activation", "swish2"), ("activation", 3), ("memory_corpus", 5), ("memory_corpus", []),
        ("memory_corpus", [" "]), ("memory_corpus", "some text"), ("memory_tokens", 0), ("memory_seq_len", 0),
        ("cache_memory", 1), ("seed", "0"),
    ],
    CaliNet: [
        ("layer", 1.5), ("layer", None), ("num_slots", 0), ("num_slots", 64.0), ("lr", 0), ("max_steps", 0),
        ("early_stop_loss", -1.0), ("early_stop_loss", "0.01"), ("grad_clip", 0), ("gated", "auto"),
        ("gated", 1), ("seed", 1.5),
    ],
    GRACE: [
        ("layer", 1.5), ("layer", "35"), ("layer", True), ("module", "mlp"), ("module", None), ("eps", 0),
        ("eps", -1.0), ("eps", NAN), ("edit_lr", 0), ("edit_lr", "1.0"), ("n_iter", 0), ("n_iter", 100.0),
        ("value_init", "hot"), ("value_init", None), ("eps_expand", "decay"), ("seed", 1.5),
    ],
    AlphaEdit: KEY_VALUE + [
        ("nullspace_threshold", 0), ("nullspace_threshold", -0.02), ("nullspace_threshold", "2e-2"),
        ("nullspace_threshold", NAN), ("L2", 0), ("L2", -10.0), ("L2", None), ("L2", INF),
        ("v_batch_requests", 0), ("v_batch_requests", 1.5),
    ],
    EMMET: KEY_VALUE + [
        ("mom2_update_weight", 0), ("mom2_update_weight", -1.0), ("mom2_update_weight", "1000"),
        ("v_batch_requests", 0), ("v_batch_requests", 1.5),
        ("emmet_lambda", -0.1), ("emmet_lambda", None), ("emmet_lambda", "0.1"), ("emmet_lambda", INF),
        ("update_norm_lambda", -1.0), ("update_norm_lambda", None), ("update_norm_lambda", NAN),
    ],
    WISE: [
        ("layer", 1.5), ("layer", None), ("mask_ratio", 0), ("mask_ratio", 1.5), ("edit_lr", 0), ("n_iter", 0),
        ("n_iter", 70.0), ("norm_constraint", 0), ("norm_constraint", "1"), ("act_margin", [5.0, 20.0]),
        ("act_margin", [5.0, NAN, 10.0]), ("act_margin", "5,20,10"), ("act_margin", [5.0, True, 10.0]),
        ("act_ratio", 0), ("act_ratio", None), ("save_freq", 0), ("save_freq", 500.0), ("merge_freq", 0),
        ("merge_freq", 750), ("merge_alg", "slerp"), ("merge_alg", None), ("retrieve", 1), ("weights", 0),
        ("densities", 0), ("densities", 1.5), ("weight_decay", -1e-5),
        ("context_template_length_params", [[5]]), ("context_template_length_params", [[5, 0]]),
        ("template_prompts", []), ("template_prompts", "I"), ("template_seed", 0.5),
        ("irrelevant_corpus", []), ("irrelevant_corpus", [" "]), ("irrelevant_corpus", "some text"),
        ("irrelevant_count", 0), ("irrelevant_max_tokens", 0), ("seed", "0"),
    ],
    UltraEdit: [
        ("mlp_gate_layers", [-1]), ("mlp_gate_layers", 3), ("mlp_in_layers", [1.5]), ("mlp_in_layers", [2, 2]),
        ("mlp_out_layers", "20"), ("mlp_out_layers", [], {"mlp_gate_layers": [], "mlp_in_layers": []}),
        ("lr", 0), ("lr", NAN), ("lam", 0.0), ("lam", INF), ("lam", "1"), ("chunk_size", 0), ("chunk_size", 2.5),
        ("micro_batch", 0), ("micro_batch", 8.0),
    ],
    MALMEN: [row for row in TRAINABLE if row[0] != "batch_edits"] + [
        ("rank", 0), ("rank", 1920.0), ("n_blocks", -1), ("n_blocks", 1.5), ("edit_lr", 0), ("edit_lr", "1e-6"),
        ("edit_lr", NAN), ("token", "answer"), ("token", None), ("capture_batch_size", 0),
        ("capture_batch_size", 32.0), ("net_batch_size", 0), ("net_batch_size", True),
    ],
    RLEdit: [row for row in TRAINABLE if row[0] != "batch_edits"] + [
        ("rank", 0), ("rank", 1024.0), ("n_blocks", 0), ("n_blocks", True), ("edit_lr", 0), ("edit_lr", "1e-6"),
        ("factor_positions", "ans"), ("factor_positions", None), ("edits_per_step", 0), ("edits_per_step", 2.5),
        ("episode_steps", 0), ("episode_steps", "400"), ("memory_depth", 0), ("memory_depth", 1.0),
        ("memory_decay", -0.1), ("memory_decay", 1.5), ("memory_decay", NAN), ("c_reg", -1e-4), ("c_reg", None),
    ],
}

ROWS = [(cls, *row) if len(row) == 3 else (cls, *row, {}) for cls, rows in TABLE.items() for row in rows]


def _build(cls: type, **kwargs):
    return cls(**{**REQUIRED.get(cls, {}), **kwargs})


def _editor_classes() -> set[type]:
    """Every concrete editor class defined in editlab.methods, shared bases excluded."""
    found = set()
    for info in pkgutil.iter_modules(editlab.methods.__path__):
        module = importlib.import_module(f"editlab.methods.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Editor) and obj.__module__ == module.__name__ and not inspect.isabstract(obj):
                found.add(obj)
    return found - set(BASES)


def test_the_table_covers_every_editor_and_every_argument():
    assert _editor_classes() == set(TABLE), "an editor without rows (or rows of a class that is no editor)"
    for cls in TABLE:
        arguments = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
        covered = {row[0] for row in TABLE[cls]}
        missing = [a for a in arguments if a not in covered and (cls, a) not in UNCHECKED]
        assert not missing, f"{cls.__name__}: no bad value for {missing} (add rows, or a reason to UNCHECKED)"
        unknown = sorted(covered - set(arguments))
        assert not unknown, f"{cls.__name__}: rows for {unknown}, which are not arguments"


@pytest.mark.parametrize("cls,argument,bad,extra", ROWS,
                         ids=[f"{c.__name__}-{a}={b!r}" for c, a, b, _ in ROWS])
def test_a_bad_value_is_refused_by_name(cls, argument, bad, extra):
    with pytest.raises(ValueError, match=f"^{re.escape(argument)} ") as info:
        _build(cls, **extra, **{argument: bad})
    assert isinstance(info.value, SettingError) and info.value.key == argument, info.value


@pytest.mark.parametrize("cls", list(TABLE), ids=lambda c: c.__name__)
def test_the_defaults_construct(cls):
    assert isinstance(_build(cls), Editor)


def test_ftl_early_stop_loss_none_is_refused_when_built():
    """Not a TypeError at the first optimisation step: FT-L always compares the loss with it."""
    with pytest.raises(SettingError, match=r"^early_stop_loss must be a finite number, got None$"):
        FTL(early_stop_loss=None)


@pytest.mark.parametrize("cls,kwargs", [
    (FTL, {"lr": 1, "weight_decay": 0, "early_stop_loss": 0, "norm_constraint": 5e-4, "layers": (3, 1)}),
    (FTL, {"module": "attn_out", "objective": "teacher_forced", "replay": False}),
    (ROME, {"v_lr": 1, "clamp_norm_factor": 4, "mom2_n_tokens": 1000, "context_template_length_params": [],
            "mom2_dtype": "float64", "stats_cache_dir": "/tmp/stats", "r_rome": True}),
    (MEMIT, {"mom2_update_weight": 20000, "layers": [4, 3], "v_batch_requests": 1}),
    (KN, {"p": 0, "adaptive_threshold": 0, "old_scale": 0, "refine": True}),
    (MEND, {"combine": False, "one_sided": True, "n_hidden": 0, "lr_lr": 0, "c_edit": 1, "base_model": "gpt2"}),
    (KE, {"margin": 0, "margin_min": 0, "margin_decay": 1, "anneal_threshold": 1, "label_smoothing": 0}),
    (SERAC, {"freeze_cntr": True, "cross_attend": True, "threshold": 0.9, "scale": 2, "dropout": 0}),
    (IKE, {"k": 0, "train_data": None, "demo_ratio": [1, 0, 0], "query_format": "", "cache_dir": "/tmp/ike"}),
    (TPatcher, {"layer": -1, "grad_clip": None, "value_amplify": None, "activation": "gelu_new",
                "memory_corpus": ["a prompt"], "memory_margin_edit": -1}),
    (CaliNet, {"layer": 0, "early_stop_loss": None, "grad_clip": None, "gated": True, "lr": 1}),
    (UltraEdit, {"mlp_gate_layers": [], "mlp_in_layers": [], "mlp_out_layers": [3, 1], "lr": 1, "lam": 2}),
])
def test_good_values_construct_and_numbers_are_kept_as_their_type(cls, kwargs):
    editor = _build(cls, **kwargs)
    for name in ("lr", "v_lr", "mom2_update_weight", "clamp_norm_factor", "weight_decay", "c_edit", "scale_init"):
        if name in kwargs or (name == "scale_init" and "scale" in kwargs):
            assert type(getattr(editor, name)) is float, name
    if "layers" in kwargs:
        assert editor.layers == sorted(kwargs["layers"])
