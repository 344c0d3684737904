"""The field's circuit tasks on a real model, built from its tokenizer: IOI, greater-than,
repeated random tokens and a repeated name. Each returns a `circuits.tasks.Task` whose metric
reads the last position (greater-than and IOI as in the papers), every prompt one token length.

- IOI (Wang et al. 2022, "Interpretability in the Wild"): "When Mary and John went to the
  store, John gave a drink to" → " Mary". Templates × names × places × objects, names, places
  and objects kept only when they are single tokens of THIS tokenizer (with a leading space),
  templates only of one token length. Balanced: prompts come in pairs that swap IO and S, so
  each name is as often IO as S, and half the prompts are ABBA, half BABA. Corrupted: the ABC
  dataset (the same template, place and object with three other distinct names, so no name
  repeats). Metric: logit(IO) − logit(S) at the last position.
- greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17". With
  a tokenizer whose years split as " 17" + "32" (GPT-2's), the original: the next token is the
  two-digit year, metric Σ p(y > YY) − Σ p(y ≤ YY) over the 100 two-digit tokens. A tokenizer
  that spells digits singly (Gemma: "1732" → 1,7,3,2) predicts the TENS digit after "17"; the
  adapted metric is Σ p(d > Y) − Σ p(d < Y) over the digit tokens (Y = the tens digit of YY;
  d = Y is left out, it cannot tell), with YY in 10..89 so both sides exist. Corrupted: 1701.
- repeat-tokens: `circuits.tasks.induction_task` on ordinary tokens of the model's vocabulary
  (single words, no special or unused ids); metric the mean log-prob in the second copy.
- repeat-name (docstring-like copying): "Mary has a key. The key belongs to" → " Mary";
  corrupted with another name; metric logit(name) − logit(other name).

`check_task(model, task)` runs the model on the clean prompts: mean metric and accuracy (the
share of prompts whose right answer wins), so a task the model cannot do is dropped with numbers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from circuits.tasks import Task, TaskError, induction_task, widen

NAMES = (
    "Mary John Alice Bob Tom James Michael David Sarah Emma Anna Paul Mark Peter Kate Lisa Laura "
    "Daniel Rachel Steven Jessica Andrew Thomas Robert Richard Linda Susan Karen Nancy Betty Helen "
    "Eric Jason Kevin Brian George Edward Jack Henry Frank Grace Rose Amy Emily Ryan Adam Sam Ben"
).split()
PLACES = "store school park restaurant office hospital station garden house church library market".split()
OBJECTS = "drink ring kiss bone basketball computer necklace snack apple book letter key".split()
IOI_TEMPLATES = (  # {A} = IO in ABBA order; BABA swaps the first two names (Wang et al., appendix)
    "When {A} and {B} went to the {PLACE}, {B} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {B} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {B} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {B} gave a {OBJECT} to",
    "While {A} and {B} were commuting to the {PLACE}, {B} gave a {OBJECT} to",
    "Afterwards, {A} and {B} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {A} and {B} had a lot of fun at the {PLACE}. {B} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {B} decided to give it to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {B} gave it to",
)
NOUNS = (
    "war dynasty empire reign occupation rule conflict expedition pilgrimage siege revolution "
    "campaign drought famine crisis journey voyage era"
).split()
REPEAT_NAME_TEMPLATES = (
    "{A} has a {OBJECT}. The {OBJECT} belongs to",
    "{A} bought a {OBJECT}. Now the {OBJECT} belongs to",
)
REAL_TASKS = ("ioi", "greater-than", "repeat-tokens", "repeat-name")


def single_tokens(model, words, space: bool = True) -> dict[str, int]:
    """word -> token id for the words that are one token of `model`'s tokenizer (with a leading
    space when `space`), in the order given."""
    out = {}
    for word in words:
        ids = model.tokenize((" " if space else "") + word, prepend_bos=False)[0].tolist()
        if len(ids) == 1:
            out[word] = ids[0]
    return out


def _need(found: dict, least: int, what: str, model) -> list[str]:
    if len(found) < least:
        raise TaskError(
            f"model {model.spec!r}: only {len(found)} {what} are single tokens of its tokenizer "
            f"({', '.join(found) or 'none'}); the task needs at least {least}"
        )
    return list(found)


def _encode_all(model, texts: list[str], what: str) -> Tensor:
    rows = [model.tokenize(t)[0] for t in texts]
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise TaskError(f"{what}: prompts tokenize to lengths {lengths}; they must share one")
    return torch.stack(rows)


def _one_length_templates(model, templates, fill: dict) -> list[str]:
    """The templates of the most common token length when filled with `fill` (ties: the
    longest list, then the first template's length)."""
    lengths = [model.tokenize(t.format(**fill)).shape[1] for t in templates]
    best = max(set(lengths), key=lambda n: (lengths.count(n), -lengths.index(n)))
    return [t for t, n in zip(templates, lengths) if n == best]


def _same_length(model, template: str, slot: str, items: list[str], fill: dict) -> list[str]:
    """The `items` that, put in `slot` of `template` (the other slots from `fill`), give the most
    common token length: a word that merges with the punctuation after it is left out."""
    lengths = [model.tokenize(template.format(**{**fill, slot: item})).shape[1] for item in items]
    best = max(set(lengths), key=lengths.count) if lengths else 0
    return [item for item, n in zip(items, lengths) if n == best]


def logit_diff_metric(right: Tensor, wrong: Tensor) -> Callable[[Tensor, slice], Tensor]:
    """logit(right) − logit(wrong) at the last position; `right`, `wrong` [N] token ids."""

    def metric(logits: Tensor, rows: slice = slice(None)) -> Tensor:
        last = widen(logits[:, -1])
        a = last.gather(1, right[rows].to(last.device).unsqueeze(1))
        b = last.gather(1, wrong[rows].to(last.device).unsqueeze(1))
        return (a - b).squeeze(1)

    metric.last_position_only = True  # type: ignore[attr-defined]  # heads.py reads only the last logits
    return metric


def prob_diff_metric(candidates: Tensor, sign: Tensor) -> Callable[[Tensor, slice], Tensor]:
    """Σ_c sign[n, c] · p(candidates[c]) at the last position (softmax over the whole vocabulary);
    `candidates` [C] token ids, `sign` [N, C] in {−1, 0, 1}."""

    def metric(logits: Tensor, rows: slice = slice(None)) -> Tensor:
        probs = widen(logits[:, -1]).softmax(-1)[:, candidates.to(logits.device)]
        return (probs * sign[rows].to(probs.device, probs.dtype)).sum(1)

    metric.last_position_only = True  # type: ignore[attr-defined]
    return metric


def ioi_task(model, n: int = 16, seed: int = 0) -> Task:
    """IOI with ABC corruption, `n` (even) prompts; see the module docstring. ground_truth holds
    the IO/S token ids and orders ("io", "s", "abba": [N]) for analysis. Raises TaskError."""
    if n < 2 or n % 2:
        raise TaskError(f"ioi: the prompt count must be even and >= 2 (IO/S pairs), got {n}")
    names = single_tokens(model, NAMES)
    name_list = _need(names, 8, "names", model)
    places = _need(single_tokens(model, PLACES), 1, "places", model)
    objects = _need(single_tokens(model, OBJECTS), 1, "objects", model)
    fill = dict(A=name_list[0], B=name_list[1], PLACE=places[0], OBJECT=objects[0])
    templates = _one_length_templates(model, IOI_TEMPLATES, fill)
    for template in templates:
        places = _same_length(model, template, "PLACE", places, fill)
        objects = _same_length(model, template, "OBJECT", objects, fill)
        name_list = _same_length(model, template.replace("{B}", "{A}"), "A", name_list, fill)
    _need(dict.fromkeys(name_list), 8, "names (of one length in the templates)", model)
    if not places or not objects:
        raise TaskError(f"model {model.spec!r}: no place or object keeps the IOI prompts one length")
    generator = torch.Generator().manual_seed(seed)

    def pick(items, k=1):
        return [items[i] for i in torch.randperm(len(items), generator=generator)[:k].tolist()]

    clean, corrupted, io, s, abba = [], [], [], [], []
    order = torch.randperm(len(name_list), generator=generator).tolist()
    for pair in range(n // 2):
        a = name_list[order[(2 * pair) % len(order)]]
        b = name_list[order[(2 * pair + 1) % len(order)]]
        template, place, obj = pick(templates)[0], pick(places)[0], pick(objects)[0]
        first_abba = bool(pair % 2)
        others = pick([x for x in name_list if x not in (a, b)], 3)
        for this_io, this_s, is_abba in ((a, b, first_abba), (b, a, not first_abba)):
            first, second = (this_io, this_s) if is_abba else (this_s, this_io)
            clean.append(_fill_ioi(template, first, second, this_s, place, obj))
            corrupted.append(_fill_ioi(template, others[0], others[1], others[2], place, obj))
            io.append(names[this_io])
            s.append(names[this_s])
            abba.append(is_abba)
    right, wrong = torch.tensor(io), torch.tensor(s)
    task = Task(
        "ioi",
        _encode_all(model, clean, "ioi clean"),
        _encode_all(model, corrupted, "ioi corrupted"),
        logit_diff_metric(right, wrong),
    )
    task.ground_truth = {"io": io, "s": s, "abba": abba, "texts": clean}
    return task


def _fill_ioi(template: str, first: str, second: str, subject: str, place: str, obj: str) -> str:
    """The template with its name slots `first`, `second` and the repeated (S2) slot `subject`."""
    text = template.replace("{A}", first).replace("{B}", second, 1).replace("{B}", subject)
    return text.format(PLACE=place, OBJECT=obj)


def greater_than_task(model, n: int = 16, seed: int = 0) -> Task:
    """Greater-than with start year 1701 as corruption; the original two-digit metric for
    tokenizers with " 17" + "YY" years, the tens-digit adaptation for digit-by-digit ones (see
    the module docstring). ground_truth: "years" [N] (YY), "mode" ("two-digit" | "tens-digit")."""
    nouns = _need(single_tokens(model, NOUNS), 1, "nouns", model)
    two_digit = _two_digit_years(model)
    digits = single_tokens(model, [str(d) for d in range(10)], space=False)
    if two_digit:
        mode, years = "two-digit", sorted(y for y in two_digit if 2 <= y <= 98)
    elif len(digits) == 10 and model.tokenize("1732", prepend_bos=False)[0].tolist() == [
        digits[c] for c in "1732"
    ]:
        mode, years = "tens-digit", list(range(10, 90))
    else:
        raise TaskError(
            f"model {model.spec!r}: its tokenizer neither splits years as ' 17' + two digits nor "
            "spells digits singly, so greater-than has no next-token answer set"
        )
    generator = torch.Generator().manual_seed(seed)
    picked = [years[i] for i in torch.randint(len(years), (n,), generator=generator).tolist()]
    noun_ids = torch.randint(len(nouns), (n,), generator=generator).tolist()
    template = "The {NOUN} lasted from the year 17{YY:02d} to the year 17"
    clean = [template.format(NOUN=nouns[k], YY=yy) for k, yy in zip(noun_ids, picked)]
    corrupted = [template.format(NOUN=nouns[k], YY=1) for k in noun_ids]
    if mode == "two-digit":  # every listed two-digit year token; "greater" means y > YY
        values = torch.tensor(sorted(two_digit))
        candidates = [two_digit[int(v)] for v in values]
        sign = torch.where(values > torch.tensor(picked).unsqueeze(1), 1.0, -1.0)
    else:  # the tens digit d after "17": greater when d > Y, smaller when d < Y, d = Y undecided
        tens = torch.tensor(picked).unsqueeze(1) // 10
        sign = (torch.arange(10) > tens).float() - (torch.arange(10) < tens).float()
        candidates = [digits[str(d)] for d in range(10)]
    task = Task(
        "greater-than",
        _encode_all(model, clean, "greater-than clean"),
        _encode_all(model, corrupted, "greater-than corrupted"),
        prob_diff_metric(torch.tensor(candidates), sign),
    )
    task.ground_truth = {"years": picked, "mode": mode, "texts": clean}
    return task


def _two_digit_years(model) -> dict[int, int]:
    """YY -> token id of "YY" for the years " 17YY" splits into " 17" + "YY" (GPT-2 style); {}
    when " 17" is not one token or fewer than 50 years split so."""
    seventeen = model.tokenize(" 17", prepend_bos=False)[0].tolist()
    if len(seventeen) != 1:
        return {}
    years = {}
    for yy in range(100):
        ids = model.tokenize(f" 17{yy:02d}", prepend_bos=False)[0].tolist()
        alone = model.tokenize(f"{yy:02d}", prepend_bos=False)[0].tolist()
        if len(ids) == 2 and ids[0] == seventeen[0] and len(alone) == 1 and ids[1] == alone[0]:
            years[yy] = ids[1]
    return years if len(years) >= 50 else {}


def ordinary_tokens(model, least: int = 64) -> Tensor:
    """Ids of the vocabulary's ordinary word tokens: a leading-space marker (Ġ, ▁) and 2+ ASCII
    letters, so random sequences avoid special, byte and unused tokens. Raises TaskError."""
    tokenizer = model.tokenizer
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), model.d_vocab))))
    ids = [
        i
        for i, p in enumerate(pieces)
        if p and p[0] in "Ġ▁" and len(p) > 2 and p[1:].isascii() and p[1:].isalpha()
    ]
    if len(ids) < least:
        raise TaskError(f"model {model.spec!r}: only {len(ids)} ordinary word tokens (need {least})")
    return torch.tensor(ids)


def repeat_tokens_task(model, n: int = 16, length: int = 17, seed: int = 0) -> Task:
    """`induction_task`'s repeated random segments, drawn from `ordinary_tokens(model)`, BOS
    first; metric: the mean log-prob of the next token in the second copy."""
    from circuits.tasks import next_token_logprob

    allowed = ordinary_tokens(model)
    base = induction_task(len(allowed) + 1, n=n, length=length, bos=0, seed=seed, name="repeat-tokens")

    def mapped(tokens: Tensor) -> Tensor:
        out = allowed[(tokens - 1).clamp_min(0)]
        out[:, 0] = model.bos_token_id
        return out

    clean = mapped(base.clean)
    return Task(
        "repeat-tokens",
        clean,
        mapped(base.corrupted),
        next_token_logprob(clean, base.positions),
        positions=base.positions,
    )


def repeat_name_task(model, n: int = 16, seed: int = 0) -> Task:
    """ "Mary has a key. The key belongs to" → " Mary" (the name copied from context); corrupted:
    another name in its place. Pairs swap the two names, so each is as often right as wrong.
    Metric logit(name) − logit(other name) at the last position. Raises TaskError."""
    if n < 2 or n % 2:
        raise TaskError(f"repeat-name: the prompt count must be even and >= 2, got {n}")
    names = single_tokens(model, NAMES)
    name_list = _need(names, 4, "names", model)
    objects = _need(single_tokens(model, OBJECTS), 1, "objects", model)
    fill = dict(A=name_list[0], OBJECT=objects[0])
    templates = _one_length_templates(model, REPEAT_NAME_TEMPLATES, fill)
    for template in templates:
        objects = _same_length(model, template, "OBJECT", objects, fill)
        name_list = _same_length(model, template, "A", name_list, fill)
    _need(dict.fromkeys(name_list), 4, "names (of one length in the templates)", model)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(name_list), generator=generator).tolist()
    clean, corrupted, right, wrong = [], [], [], []
    for pair in range(n // 2):
        a, b = name_list[order[(2 * pair) % len(order)]], name_list[order[(2 * pair + 1) % len(order)]]
        template = templates[int(torch.randint(len(templates), (1,), generator=generator))]
        obj = objects[int(torch.randint(len(objects), (1,), generator=generator))]
        for x, y in ((a, b), (b, a)):
            clean.append(template.format(A=x, OBJECT=obj))
            corrupted.append(template.format(A=y, OBJECT=obj))
            right.append(names[x])
            wrong.append(names[y])
    task = Task(
        "repeat-name",
        _encode_all(model, clean, "repeat-name clean"),
        _encode_all(model, corrupted, "repeat-name corrupted"),
        logit_diff_metric(torch.tensor(right), torch.tensor(wrong)),
    )
    task.ground_truth = {"io": right, "s": wrong, "texts": clean}
    return task


def real_task(name: str, model, n: int = 16, seed: int = 0, length: int = 17) -> Task:
    """The task `name` (one of REAL_TASKS) on `model`. Raises TaskError for other names."""
    if name == "ioi":
        return ioi_task(model, n, seed)
    if name == "greater-than":
        return greater_than_task(model, n, seed)
    if name == "repeat-tokens":
        return repeat_tokens_task(model, n, length, seed)
    if name == "repeat-name":
        return repeat_name_task(model, n, seed)
    raise TaskError(f"unknown real-model task {name!r} (one of {', '.join(REAL_TASKS)})")


class TaskCheck(NamedTuple):
    """Whether the model does a task, on its clean prompts."""

    metric: float
    """Mean metric on the clean prompts."""
    corrupted: float
    """Mean metric on the corrupted prompts (the gap to `metric` is what a circuit must carry)."""
    accuracy: float
    """Share of prompts where the right answer wins: metric > 0 (IO over S, more probability on
    later years, the name over the other); for repeat-tokens, the share of second-copy positions
    whose top token is the repeated one."""
    prompts: int

    @property
    def does_task(self) -> bool:
        """Whether the model does the task: accuracy at least MIN_ACCURACY and the clean metric
        above the corrupted one (else a circuit has no behaviour to carry)."""
        return self.accuracy >= MIN_ACCURACY and self.metric > self.corrupted

    def why_not(self) -> str:
        """Why `does_task` is false, in a few words ("" when it is true)."""
        if self.accuracy < MIN_ACCURACY:
            return f"accuracy {self.accuracy:.2f} < {MIN_ACCURACY}"
        if self.metric <= self.corrupted:
            return f"clean metric {self.metric:.3g} <= corrupted {self.corrupted:.3g}"
        return ""


MIN_ACCURACY = 0.6
"""A model whose clean accuracy on a real task is below this does not do it (the benchmark drops
the task; a single circuit is written with a warning)."""


def check_task(model, task: Task, batch_size: int = 8) -> TaskCheck:
    """Run `model` on the task's clean and corrupted prompts (no gradients, chunked)."""
    values, wrong_values, hits, total = [], [], 0, 0
    with torch.no_grad():
        for start in range(0, len(task.clean), batch_size):
            rows = slice(start, start + batch_size)
            logits = model(task.clean[rows])
            values.append(task.metric(logits, rows).cpu())
            wrong_values.append(task.metric(model(task.corrupted[rows]), rows).cpu())
            if task.positions is not None:
                where = task.positions[rows, :-1].to(logits.device)
                right = logits[:, :-1].argmax(-1) == task.clean[rows, 1:].to(logits.device)
                hits, total = hits + int((right & where).sum()), total + int(where.sum())
    value = torch.cat(values)
    accuracy = hits / max(total, 1) if task.positions is not None else float((value > 0).float().mean())
    return TaskCheck(float(value.mean()), float(torch.cat(wrong_values).mean()), accuracy, len(value))


def ioi_positions(task: Task) -> dict[str, Tensor]:
    """[N] token positions of IO, S1, S2 and END (the last) in each clean IOI prompt."""
    io, s = task.ground_truth["io"], task.ground_truth["s"]
    out: dict[str, list[int]] = {"IO": [], "S1": [], "S2": [], "END": []}
    for row, io_id, s_id in zip(task.clean.tolist(), io, s):
        s_at = [p for p, t in enumerate(row) if t == s_id]
        out["IO"].append(row.index(io_id))
        out["S1"].append(s_at[0])
        out["S2"].append(s_at[-1])
        out["END"].append(len(row) - 1)
    return {k: torch.tensor(v) for k, v in out.items()}


ROLE_ATTENTION = {  # role: (query, key) of the attention that shows it (Wang et al. 2022)
    "name mover": ("END", "IO"),
    "S-inhibition": ("END", "S2"),
    "duplicate-token": ("S2", "S1"),
    "induction": ("S2", "S1+1"),
}


def ioi_head_roles(model, task: Task, heads: dict[str, float], threshold: float = 0.25) -> list[dict]:
    """Name each head of `heads` (a{L}.{h} -> its score, m(ablated) − m(clean)) by its attention
    on the clean IOI prompts (`blocks.L.attn.hook_pattern`, mean over prompts): for each role of
    ROLE_ATTENTION the attention from its query to its key position; the role is the first whose
    attention reaches `threshold` and exceeds the others from the same query, "negative name
    mover" for a name mover whose ablation raises the logit difference, else "other"."""
    where = ioi_positions(task)
    where["S1+1"] = where["S1"] + 1
    layers = sorted({int(h[1:].split(".")[0]) for h in heads})
    patterns: dict[int, Tensor] = {}

    def grab(layer):
        def hook_fn(activation, hook):
            patterns[layer] = activation.detach().float().cpu()

        return hook_fn

    with (
        torch.no_grad(),
        model.hooks([(f"blocks.{layer}.attn.hook_pattern", grab(layer)) for layer in layers]),
    ):
        model(task.clean)
    rows, out = torch.arange(len(task.clean)), []
    for head, score in heads.items():
        layer, index = (int(x) for x in head[1:].split("."))
        pattern = patterns[layer][:, index]  # [N, query, key]
        attention = {
            role: float(pattern[rows, where[q], where[k]].mean()) for role, (q, k) in ROLE_ATTENTION.items()
        }
        role = "other"
        for name, (query, _) in ROLE_ATTENTION.items():
            rivals = [attention[r] for r, (q, _) in ROLE_ATTENTION.items() if q == query and r != name]
            if attention[name] >= threshold and all(attention[name] > r for r in rivals):
                role = name
                break
        if role == "name mover" and score > 0:
            role = "negative name mover"
        out.append({"head": head, "score": score, "role": role, **attention})
    return out
