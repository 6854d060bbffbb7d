"""Edit one fact (or a few) and see what changed: ``python -m editlab.edit`` and ``editlab.edit(...)``.

Command line (Hydra ``key=value`` overrides; ``model`` and ``method`` name configs of
``editlab/configs/model/`` and ``editlab/configs/method/``, presets such as ``method=rome/<model>``
included, and ``method.<name>=...`` sets any hyperparameter)::

    python -m editlab.edit model=smollm2_135m method=rome/smollm2_135m \\
        prompt="Darmstadt is located in the country of" subject=Darmstadt \\
        target=Argentina target_true=Germany 'probes=["Darmstadt, which is located in"]'

edits the model, then prints one table per fact: for the edit prompt and each probe, the greedy
answer before and after the edit (at most ``max_new_tokens`` tokens, cut at a newline, EOS or the
end of a sentence) and the probability of the new target (and of ``target_true``, when given)
before → after.  A probability is that of the whole target (the product over its tokens),
teacher-forced after the prompt.  Nothing is written unless ``save`` is set; progress messages go
to stderr, the table to stdout.  The first run on a model converts a packaged model (SmolLM2: about
a minute) and, for methods that need key statistics (ROME, MEMIT with ``mom2_adjustment``), runs
the statistics pass once (SmolLM2, layer 5: about 20 minutes on a busy CPU); both are cached.

A fact's fields:
    prompt       the edit prompt, subject filled in ("Darmstadt is located in the country of").
    subject      the subject exactly as it occurs in the prompt ("Darmstadt"); locate-then-edit
                 methods (ROME, MEMIT, ...) edit at its tokens.
    target       the new answer ("Argentina"); a leading space is added when it is scored.
    target_true  optional: the answer before the edit, to show P(target_true) too.
    probes       optional: more prompts to answer before and after (paraphrases, neighbours, ...).

Several facts, edited together as one batch edit: ``facts=FILE.json`` (a JSON list of objects with
the fields above) or ``'facts=[{prompt: "...", subject: "...", target: "..."}, {...}]'``.

Other settings:
    ckpt_path=PATH   a trained editor (MEND, KE, SERAC): the checkpoint ``python -m editlab.train``
                     wrote for it; the editor is rebuilt from the config stored in it (no method=).
    save=DIR         (or --save DIR) write the edited model to DIR (safetensors, config and
                     tokenizer, loadable with ``from_pretrained``) and ``editlab_edit.json`` (the
                     facts and the table's numbers).  Only weight edits can be saved; DIR must be empty or new.
    max_new_tokens=N length cap of the greedy answers (default 8).
    seed=N           torch's seed before the edit (default 0).
    model.device=cuda, model.dtype=bfloat16, ...: any setting of the model config.

Quoting: Hydra parses each value, so quote (for Hydra, inside the shell's quotes) values holding
commas, quotes, colons or brackets, and those that read as numbers or booleans:
``'target="1990"'``, ``"prompt=\\"Darrieux's mother tongue is\\""``.  ``--help`` prints this text
and the model and method configs; ``--cfg job`` prints the composed config.

Python (``model``: a config name or a loaded :class:`~editlab.models.loading.ModelBundle`;
``method``: a config name or an :class:`~editlab.methods.base.Editor`; ``overrides``: Hydra
overrides of the configs)::

    import editlab

    with editlab.edit(prompt="Darmstadt is located in the country of", subject="Darmstadt",
                      target="Argentina", target_true="Germany", model="smollm2_135m",
                      method="rome/smollm2_135m") as edited:
        print(edited.table())
        edited.model          # the edited model (query it here), edited.tokenizer
        edited.rows           # the table's numbers: one Row per prompt
        edited.save("out/")   # or save="out/" in the call
    # here the model's weights are bit-exactly what they were before the edit

``editlab.edit`` is this module, made callable: ``editlab.edit(...)`` calls :func:`edit`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editlab.data.collate import check_lengths
from editlab.data.records import EditRecord, RecordError
from editlab.errors import UserError
from editlab.methods.base import EditError, Editor, WeightEditSession
from editlab.models.arch import arch_for
from editlab.models.loading import ModelBundle

# what scores a model: the greedy answers and the teacher-forced target probabilities
from editlab.evaluation.generation import greedy_generate
from editlab.evaluation.teacher_forced import score_pairs

__all__ = ["CONFIG_DIR", "EditInputError", "Edited", "Fact", "Row", "edit", "edited", "load_facts", "main"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FACT_FIELDS = ("prompt", "subject", "target", "target_true", "probes")


class EditInputError(UserError, ValueError):
    """A setting of the edit command is missing or malformed; the message names it."""


# ------------------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class Fact:
    """One requested edit (``record``) and the extra prompts answered before and after it."""

    record: EditRecord
    probes: tuple[str, ...] = ()

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.record.prompt, *self.probes)


def _text(value: Any, source: str, index: int | None, name: str, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise RecordError(source, index, name, "is missing")
        return None
    if not isinstance(value, str):
        raise RecordError(source, index, name,
                          f"must be a string, got {value!r} ({type(value).__name__}); on the command line "
                          f"quote it for Hydra: '{name}=\"{value}\"'")
    if not value.strip():
        raise RecordError(source, index, name, f"must be a non-empty string, got {value!r}")
    return value


def make_fact(fields: Mapping[str, Any], source: str = "fact", index: int | None = None) -> Fact:
    """A :class:`Fact` from its fields (:data:`FACT_FIELDS`), checked; :class:`RecordError`
    names the source, the fact's index and the field."""
    unknown = sorted(set(fields) - set(FACT_FIELDS))
    if unknown:
        raise RecordError(source, index, unknown[0], f"unknown field; a fact has {', '.join(FACT_FIELDS)}")
    prompt = _text(fields.get("prompt"), source, index, "prompt")
    subject = _text(fields.get("subject"), source, index, "subject")
    target = _text(fields.get("target"), source, index, "target")
    target_true = _text(fields.get("target_true"), source, index, "target_true", required=False)
    if subject not in prompt:
        raise RecordError(source, index, "subject",
                          f"{subject!r} does not occur in the prompt {prompt!r}; give it as the prompt spells it")
    probes = fields.get("probes") or ()
    if isinstance(probes, str):
        probes = (probes,)
    if not isinstance(probes, Sequence):
        raise RecordError(source, index, "probes", f"must be a list of prompts, got {probes!r}")
    probes = tuple(_text(p, source, index, f"probes[{i}]") for i, p in enumerate(probes))
    record = EditRecord(record_id=index if index is not None else 0, prompt=prompt, subject=subject,
                        target_new=target, target_true=target_true, source=source,
                        index=index if index is not None else -1)
    return Fact(record, probes)


def load_facts(prompt: str | None = None, subject: str | None = None, target: str | None = None, *,
               target_true: str | None = None, probes: Sequence[str] | str | None = (),
               facts: str | os.PathLike | Sequence[Mapping[str, Any] | EditRecord] | None = None) -> list[Fact]:
    """The facts to edit: one given by its fields, or ``facts`` (a list of field mappings or
    :class:`~editlab.data.records.EditRecord` objects, or the path of a JSON file holding a list of
    field mappings).  Everything is checked before any model is loaded."""
    single = {"prompt": prompt, "subject": subject, "target": target, "target_true": target_true}
    given = [name for name, value in single.items() if value is not None]
    if facts is None:
        if not given:
            raise EditInputError("no fact to edit: give prompt=, subject= and target= (one fact), "
                                 "or facts= (a list, or a JSON file)")
        return [make_fact({**single, "probes": probes}, "fact")]
    if given or probes:
        extra = given + (["probes"] if probes else [])
        raise EditInputError(f"give one fact (prompt=, subject=, target=, ...) or facts=, not both "
                             f"(got facts= and {', '.join(extra)}); a fact in facts= holds its own probes")
    source = "facts"
    if isinstance(facts, (str, os.PathLike)):
        path = Path(facts).expanduser()
        if not path.is_file():
            raise EditInputError(f"facts: no such file: {path}")
        try:
            facts = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise EditInputError(f"facts: {path} is not valid JSON: {err}") from None
        except UnicodeDecodeError as err:
            raise EditInputError(f"facts: {path} is not UTF-8 text: {err}") from None
        except (RecursionError, ValueError) as err:  # nested too deeply; an integer too long to read
            raise EditInputError(f"facts: {path} cannot be read as facts: "
                                 f"{'nested too deeply' if isinstance(err, RecursionError) else err}") from None
        source = str(path)
        if isinstance(facts, Mapping):
            facts = [facts]
    if not isinstance(facts, Sequence) or isinstance(facts, str):
        raise EditInputError(f"facts: expected a list of facts or a JSON file path, got {facts!r}")
    if not facts:
        raise EditInputError(f"facts: {source} holds no fact")
    out = []
    for i, item in enumerate(facts):
        if isinstance(item, EditRecord):
            out.append(Fact(item))
        elif isinstance(item, Mapping):
            out.append(make_fact(item, source, i))
        else:
            raise RecordError(source, i, "fact", f"must be a mapping of {', '.join(FACT_FIELDS)}, got {item!r}")
    return out


# ----------------------------------------------------------------------------- measurement
@dataclass(frozen=True)
class Row:
    """One prompt's answers and target probabilities before and after the edit.

    ``fact``: the index of the fact; ``kind``: ``edit`` (its edit prompt) or ``probe``;
    ``p_true_*``: None when the fact has no ``target_true``.
    """

    fact: int
    kind: str
    prompt: str
    before: str
    after: str
    p_new_before: float
    p_new_after: float
    p_true_before: float | None = None
    p_true_after: float | None = None


def _probabilities(model: nn.Module, tokenizer, prompts: list[str], targets: list[str]) -> list[float]:
    if not prompts:
        return []
    scores = score_pairs(model, tokenizer, prompts, targets)
    tokens = scores.mask.sum(dim=1)
    return [math.exp(-float(nll) * int(n)) for nll, n in zip(scores.nll, tokens)]


def _measure(model: nn.Module, tokenizer, facts: Sequence[Fact], max_new_tokens: int
             ) -> tuple[list[str], list[float], list[float | None]]:
    """Greedy answers, P(target_new) and P(target_true) (None without one) of every prompt."""
    prompts = [p for fact in facts for p in fact.prompts]
    owners = [fact for fact in facts for _ in fact.prompts]
    answers = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_at_answer_end=True)
    p_new = _probabilities(model, tokenizer, prompts, [f.record.target_new for f in owners])
    with_true = [k for k, f in enumerate(owners) if f.record.has_true_target]
    p_true: list[float | None] = [None] * len(prompts)
    found = _probabilities(model, tokenizer, [prompts[k] for k in with_true],
                           [owners[k].record.target_true for k in with_true])
    for k, p in zip(with_true, found):
        p_true[k] = p
    return answers, p_new, p_true


# --------------------------------------------------------------------------------- result
@dataclass
class Edited:
    """What :func:`edit` yields inside its ``with`` block: the edited model and the comparison.

    Attributes:
        model: the edited model to query (the editor's wrapper for memory-based editors).
        tokenizer: its tokenizer.
        bundle: the base model's bundle (``bundle.model`` holds the weight edits).
        editor: the editor that made the edit.
        session: the :class:`~editlab.methods.base.WeightEditSession` holding the edit
            (``session.deltas``: the weight updates); it is undone when the block ends.
        facts: the edited facts; rows: one :class:`Row` per prompt, fact by fact.
        seconds: time to compute and install the edit.
        method_config: the editor's config when it was built from one (kept by :meth:`save`).
    """

    model: nn.Module
    tokenizer: Any
    bundle: ModelBundle
    editor: Editor
    session: WeightEditSession
    facts: list[Fact]
    rows: list[Row]
    seconds: float
    method_config: dict | None = None

    def table(self) -> str:
        """The before / after comparison, one table per fact."""
        return format_table(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the edited model to ``path`` (safetensors, config and tokenizer, for
        ``from_pretrained``) and ``editlab_edit.json`` (facts, editor, rows).  Weight edits only:
        an edit held as memory or as added modules is not in the weights and cannot be saved."""
        if self.session.memory or self.session.patches:
            held = "a memory of edits" if self.session.memory else "modules added to the model"
            raise EditInputError(f"save: {type(self.editor).__name__} keeps its edit as {held}, not in the "
                                 "model's weights; only weight edits can be saved as a model")
        path = check_save_dir(path)
        path.mkdir(parents=True, exist_ok=True)
        self.bundle.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        info = {
            "base_model": self.bundle.name,
            "editor": type(self.editor).__name__,
            "method": self.method_config,
            "facts": [{"prompt": f.record.prompt, "subject": f.record.subject, "target": f.record.target_new,
                       "target_true": f.record.target_true, "probes": list(f.probes)} for f in self.facts],
            "edited_parameters": sorted(self.session.deltas),
            "rows": [asdict(r) for r in self.rows],
        }
        (path / "editlab_edit.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def check_settings(max_new_tokens: int, save: str | os.PathLike | None) -> None:
    """``max_new_tokens`` is a positive integer; ``save``, when set, a directory that may be written."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise EditInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if save is not None:
        check_save_dir(save)


def check_save_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory ``save`` may write to: new, or empty."""
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise EditInputError(f"save: {path} exists and is not an empty directory; choose a new one")
    return path


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value >= 1e-3 else f"{value:.1e}"


def _short(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _grid(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]


def format_table(result: Edited) -> str:
    """One table per fact: prompt, answer before and after, P(target_new) and P(target_true)."""
    n = len(result.facts)
    lines = [f"{type(result.editor).__name__} on {result.bundle.name}: {n} fact{'s' if n != 1 else ''} "
             f"edited in {result.seconds:.1f} s"]
    for i, fact in enumerate(result.facts):
        rec = fact.record
        new = rec.target_new.strip()
        true = rec.target_true.strip() if rec.has_true_target else None
        lines += ["", f"fact {i}: {rec.prompt} → {new}" + (f" (was {true})" if true else "")
                  + f"   [subject: {rec.subject}]"]
        header = ["", "prompt", "before", "after", f"P({_short(new, 20)}) before → after"]
        if true:
            header.append(f"P({_short(true, 20)}) before → after")
        table = []
        for row in (r for r in result.rows if r.fact == i):
            cells = [row.kind, _short(row.prompt, 48), _short(row.before, 28) or "(empty)",
                     _short(row.after, 28) or "(empty)", f"{_p(row.p_new_before)} → {_p(row.p_new_after)}"]
            if true:
                cells.append(f"{_p(row.p_true_before)} → {_p(row.p_true_after)}")
            table.append(cells)
        lines += _grid(header, table)
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the edit
@contextlib.contextmanager
def edited(bundle: ModelBundle, editor: Editor, facts: Sequence[Fact], *, max_new_tokens: int = 8,
           save: str | os.PathLike | None = None, seed: int | None = 0,
           method_config: dict | None = None) -> Iterator[Edited]:
    """Measure ``facts`` on ``bundle``, edit them in (one batch edit), measure again, and yield
    the :class:`Edited` result; the model is restored bit-exactly when the block ends (or fails)."""
    facts = list(facts)
    if not facts:
        raise EditInputError("no fact to edit")
    check_settings(max_new_tokens, save)
    if isinstance(editor, nn.Module):  # a trained editor: beside the model, never training
        editor.to(bundle.device)
        editor.eval()
    model, tokenizer = bundle.model, bundle.tokenizer
    # a fact longer than the model takes is refused with its lengths, before the model runs
    check_lengths([f.record for f in facts], tokenizer, arch_for(model).max_positions(model),
                  answer_tokens=max_new_tokens, model_name=bundle.name or "the model")
    before = _measure(model, tokenizer, facts, max_new_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    start = time.perf_counter()
    with editor.apply(model, tokenizer, [f.record for f in facts]) as session:
        seconds = time.perf_counter() - start
        after = _measure(session.forward_model, tokenizer, facts, max_new_tokens)
        kinds = [(i, kind, p) for i, f in enumerate(facts)
                 for kind, p in zip(("edit",) + ("probe",) * len(f.probes), f.prompts)]
        rows = [Row(i, kind, prompt, before[0][k], after[0][k], before[1][k], after[1][k], before[2][k], after[2][k])
                for k, (i, kind, prompt) in enumerate(kinds)]
        result = Edited(session.forward_model, tokenizer, bundle, editor, session, facts, rows, seconds,
                        method_config)
        if save is not None:
            result.save(save)
        yield result


def compose(model: str | None = None, method: str | None = None, overrides: Sequence[str] = ()):
    """The ``edit`` config (``editlab/configs/edit.yaml``) with ``model=``, ``method=`` and
    ``overrides`` applied, as the command line composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    chosen = ([f"model={model}"] if model is not None else []) + ([f"method={method}"] if method is not None else [])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="edit"):
        return hydra_compose(config_name="edit", overrides=[*chosen, *overrides])


def build_editor(method_cfg, ckpt_path: str | None):
    """The editor a config names (``method_cfg``), or none yet when a checkpoint is given (it is
    rebuilt once the model is loaded).  Checked before any model loads."""
    import hydra
    from omegaconf import OmegaConf

    if ckpt_path:
        if method_cfg is not None:
            raise EditInputError("give method= or ckpt_path=, not both: a checkpoint stores its editor's config")
        if not Path(ckpt_path).is_file():
            raise EditInputError(f"ckpt_path: no such file: {ckpt_path}")
        from editlab.lit.checkpoint import check_editor_checkpoint

        check_editor_checkpoint(ckpt_path)  # before the model loads: nothing it names is called
        return None
    if method_cfg is None:
        raise EditInputError("no method: pass method=<config> (see --help for the list) or ckpt_path=<trained editor>")
    from editlab.entry import settings_of

    with settings_of("method"):
        editor = hydra.utils.instantiate(method_cfg)
    if isinstance(editor, nn.Module):
        raise EditInputError(f"{type(editor).__name__} is a trained editor: pass ckpt_path=<its checkpoint> (written "
                             "by python -m editlab.train with a fit stage) instead of method=")
    if not isinstance(editor, Editor):
        raise EditInputError(f"method: {OmegaConf.select(method_cfg, '_target_')} is not an editlab Editor")
    return editor


def load_trained_editor(ckpt_path: str, bundle: ModelBundle) -> Editor:
    """The trained editor saved in ``ckpt_path``, bound to ``bundle`` (imports the training module,
    hence Lightning, only here)."""
    from editlab.lit.checkpoint import load_editor

    return load_editor(ckpt_path, bundle)


def edit(prompt: str | None = None, subject: str | None = None, target: str | None = None, *,
         target_true: str | None = None, probes: Sequence[str] | str = (),
         facts: str | os.PathLike | Sequence[Mapping[str, Any] | EditRecord] | None = None,
         model: str | ModelBundle = "smollm2_135m", method: str | Editor | None = None,
         overrides: Sequence[str] = (), ckpt_path: str | None = None,
         save: str | os.PathLike | None = None, max_new_tokens: int = 8, seed: int | None = 0):
    """Edit one fact (or ``facts``) into ``model`` with ``method``; a context manager.

    ``with edit(...) as edited:`` yields an :class:`Edited` (the edited model, the before / after
    rows, :meth:`Edited.table`, :meth:`Edited.save`); the model is restored bit-exactly after the
    block.  ``model``: a model config name (``tiny_llama``, ``smollm2_135m``, ...) or a loaded
    :class:`~editlab.models.loading.ModelBundle`; ``method``: a method config name (``rome``,
    ``rome/<model>`` presets, ...) or an :class:`~editlab.methods.base.Editor`; ``overrides``:
    Hydra overrides of those configs (``["method.layers=[5]", "model.device=cuda"]``);
    ``ckpt_path``: a trained editor's checkpoint instead of ``method``.  The facts, the method and
    ``save`` are checked before the model is loaded.  See the module docstring for the fields.
    """
    fact_list = load_facts(prompt, subject, target, target_true=target_true, probes=probes, facts=facts)
    check_settings(max_new_tokens, save)
    if isinstance(overrides, str):
        raise EditInputError(f"overrides must be a list of Hydra overrides, got the string {overrides!r}")
    if not isinstance(model, (str, ModelBundle)):
        raise EditInputError(f"model must be a config name or a ModelBundle, got {type(model).__name__}")
    if method is not None and not isinstance(method, (str, Editor)):
        raise EditInputError(f"method must be a config name or an Editor, got {type(method).__name__}")
    if isinstance(method, Editor) and ckpt_path:
        raise EditInputError("give method= or ckpt_path=, not both")
    by_name = {"model": model if isinstance(model, str) else None, "method": method if isinstance(method, str) else None}
    if overrides and not any(by_name.values()):
        raise EditInputError("overrides apply to configs chosen by name: give model= or method= as a config name")
    cfg = compose(by_name["model"], by_name["method"], overrides) if any(by_name.values()) else None
    method_config = None
    if isinstance(method, Editor):
        editor = method
    else:
        method_cfg = cfg.get("method") if cfg is not None else None
        editor = build_editor(method_cfg, ckpt_path)
        if method_cfg is not None:
            from omegaconf import OmegaConf
            method_config = OmegaConf.to_container(method_cfg, resolve=True)
    if isinstance(model, str):
        import hydra
        model = hydra.utils.instantiate(cfg.model)
    if editor is None:
        editor = load_trained_editor(ckpt_path, model)
    return edited(model, editor, fact_list, max_new_tokens=max_new_tokens, save=save, seed=seed,
                  method_config=method_config)


# ---------------------------------------------------------------------------- command line
def run(cfg) -> None:
    """The command: check the config's facts, method and ``save``, load the model, edit, print."""
    import hydra
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=False)
    facts = load_facts(plain.get("prompt"), plain.get("subject"), plain.get("target"),
                       target_true=plain.get("target_true"), probes=plain.get("probes"), facts=plain.get("facts"))
    check_settings(cfg.max_new_tokens, cfg.get("save"))
    editor = build_editor(cfg.get("method"), cfg.get("ckpt_path"))
    bundle = hydra.utils.instantiate(cfg.model)
    method_config = None
    if editor is None:
        editor = load_trained_editor(cfg.ckpt_path, bundle)
    else:
        method_config = OmegaConf.to_container(cfg.method, resolve=True)
    with edited(bundle, editor, facts, max_new_tokens=cfg.max_new_tokens, save=cfg.get("save"),
                seed=cfg.get("seed"), method_config=method_config) as result:
        print(result.table())
        if cfg.get("save"):
            print(f"\nsaved the edited model to {cfg.save}")


def _config_names(group: str) -> list[str]:
    root = CONFIG_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def usage() -> str:
    """``--help``: this module's documentation and the model and method configs."""
    return "\n".join([
        "usage: python -m editlab.edit model=<model> method=<method> prompt=... subject=... target=... [key=value ...]",
        "", __doc__.strip(), "",
        "model configs:  " + ", ".join(_config_names("model")),
        "method configs: " + ", ".join(_config_names("method")),
    ])




def main(argv: Sequence[str] | None = None) -> None:
    """``python -m editlab.edit``: Hydra overrides in, the before / after tables out.  Errors in
    the input are one line on stderr (exit code 2); ``HYDRA_FULL_ERROR=1`` shows the traceback."""
    import hydra

    from editlab.entry import USER_ERRORS, user_error

    args = _save_flag(list(sys.argv[1:] if argv is None else argv))
    if "-h" in args or "--help" in args:
        print(usage())
        return

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="edit")
    def _main(cfg) -> None:
        try:
            run(cfg)
        except Exception as exc:  # a user error (a failed edit included) is one line; anything else a traceback
            err = user_error(exc, (*USER_ERRORS, EditError))
            if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"editlab.edit: {err}", file=sys.stderr)
            sys.exit(2)

    sys.argv = [sys.argv[0], *args]
    _main()


def _save_flag(args: list[str]) -> list[str]:
    """``--save DIR`` / ``--save=DIR``, the usual spelling of a flag, as the override ``save=DIR``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--save":
            if i + 1 >= len(args):
                raise SystemExit("editlab.edit: --save needs a directory")
            out.append(f"save={args[i + 1]}")
            i += 2
            continue
        out.append(f"save={arg[len('--save='):]}" if arg.startswith("--save=") else arg)
        i += 1
    return out


class _CallableModule(types.ModuleType):
    """``editlab.edit`` is both this module (``python -m editlab.edit``) and the function
    :func:`edit`: calling the module calls the function."""

    def __call__(self, *args, **kwargs):
        return edit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
