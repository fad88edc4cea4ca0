"""The result as tables, JSON and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from genesis.evaluate.items import CLAUSE_LABELS
from genesis.evaluate.run import EvalError
from genesis.runs import write_atomic


def _pct(x: float | None) -> str:
    return "    -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}"


def result_sets(result: dict[str, Any]) -> tuple[str, ...]:
    """The item sets a result has: ("all", "conjunctive"), or ("all",) for an eval.json from before the sets."""
    return tuple(result["next_token"].get("sets", {"all": None}))


def in_set(metric: dict[str, Any], name: str) -> dict[str, Any]:
    """A metric's figures on one item set ("all" is the metric's own top level)."""
    return metric if name == "all" else metric["sets"][name]


def format_tables(result: dict[str, Any]) -> str:
    nt, cz = result["next_token"], result["cloze"]
    sc = cz["scorers"]
    lines = [
        f"checkpoint {result['checkpoint']} (step {result['step']}) | corpus {result['corpus']} {result['split']} "
        f"| tokenizer and lexicon of the run ({result['train_corpus']})",
        "",
        f"{'metric (accuracy %)':<44}{'set':<13}{'items':>7}{'model':>8}{'KN-3':>8}{'major.':>8}{'pos.maj':>8}",
    ]
    for name in result_sets(result):
        n, nts = in_set(sc["model_verse"], name)["n"], in_set(nt, name)
        cloze = {scorer: _pct(in_set(sc[scorer], name)["accuracy"]) for scorer in sc}
        lines += [
            f"{'next token, all pieces (teacher-forced)':<44}{name:<13}{nts['n']:>7}{_pct(nts['accuracy']):>8}",
            f"{'next token, first piece':<44}{name:<13}{nts['n']:>7}{_pct(nts['first_piece_accuracy']):>8}",
            f"{'next token, mean log p of the word (nats)':<44}{name:<13}{nts['n']:>7}{nts['mean_logprob']:>8.2f}",
            f"{'cloze, whole-verse score':<44}{name:<13}{n:>7}{cloze['model_verse']:>8}{cloze['kn3_verse']:>8}"
            f"{cloze['majority']:>8}{cloze['positional_majority']:>8}",
            f"{'cloze, suffix-only score':<44}{name:<13}{n:>7}{cloze['model_suffix']:>8}{cloze['kn3_suffix']:>8}",
        ]
        for scorer, title in LINK_ROWS:
            if scorer in sc:
                lines.append(f"{title:<44}{name:<13}{in_set(sc[scorer], name)['n']:>7}{cloze[scorer]:>8}"
                             f"{cloze['kn3_verse']:>8}{cloze['majority']:>8}{cloze['positional_majority']:>8}")
    lines.append(f"(chance = {100 / cz['n_candidates']:.1f}% with {cz['n_candidates']} candidates"
                 + ("; conjunctive: the items whose word is used as a connective, genesis.evaluate.senses)"
                    if "conjunctive" in result_sets(result) else ")"))
    if "masked_context" in result:  # an eval.json from before the metric existed lacks it
        mc = result["masked_context"]
        lines.append("")
        for name in result_sets(result) if "sets" in mc else ("all",):
            m = in_set(mc, name)
            title = "masked context" if name == "all" else f"masked context ({name} only)"
            lines.append(f"{title}: loss (nats) on the {mc['k']} tokens after each of {m['n']} connectives: "
                         f"visible {m['visible_loss']:.3f} | all connectives masked {m['masked_loss']:.3f} | "
                         f"gap {m['gap']:+.3f}")
    columns = [("next", nt), ("verse", sc["model_verse"]), ("suffix", sc["model_suffix"]), ("KN-3", sc["kn3_verse"]),
               ("major.", sc["majority"])]
    for dim, title in (("word", "connective (cloze accuracy = recall)"), ("class", "class"),
                       ("position", "position"), ("clause_length", "clause length (tokens)"), ("genre", "genre")):
        labels = list(dict.fromkeys([*nt["breakdowns"][dim], *sc["model_verse"]["breakdowns"][dim]]))
        if dim == "word":
            labels.sort(key=lambda w: -sc["model_verse"]["breakdowns"]["word"].get(w, {"n": 0})["n"])
        lines += ["", f"{title:<24}{'n next':>7}{'n cloze':>8}" + "".join(f"{c:>8}" for c, _ in columns)]
        for label in labels:
            n_next = nt["breakdowns"][dim].get(label, {"n": 0})["n"]
            n_cloze = sc["model_verse"]["breakdowns"][dim].get(label, {"n": 0})["n"]
            cells = "".join(f"{_pct(m['breakdowns'][dim].get(label, {}).get('accuracy')):>8}" for _, m in columns)
            lines.append(f"{label:<24}{n_next:>7}{n_cloze:>8}{cells}")
    if "link" in result:
        lines += ["", *format_link(result)]
    if "class_head" in result:
        lines += ["", *format_class_head(result["class_head"])]
    return "\n".join(lines)


# the link scorers' rows of the main table, each beside the trigram's and the majorities' cloze on the same items
LINK_ROWS = (("link_head", "cloze, link head (masked, read after it)"),
                ("link_probe", "cloze, frozen probe (masked, read after it)"))


def format_link(result: dict[str, Any]) -> list[str]:
    """The link scorers beside the whole-verse cloze, the trigram and the majority connective, overall, per class and
    per word, on every item set (words by their item count)."""
    link, sc = result["link"], result["cloze"]["scorers"]
    columns = [("verse", "model_verse"), ("head", "link_head"), ("probe", "link_probe"), ("KN-3", "kn3_verse"),
               ("major.", "majority")]
    columns = [(title, name) for title, name in columns if name in sc]
    sets = [name for name in result_sets(result) if name == "all" or "breakdowns" in sc["model_verse"]["sets"][name]]
    probe = link["probe"]
    lines = [f"link: the connective masked, read at its clause stop (readout {link['readout']}; {link['no_readout']} "
             f"of {link['n_items']} items read at the verse's end)",
             f"  frozen probe fitted on {probe['n_train']:,} training occurrences (L2 {probe['l2']:g}, "
             f"{probe['iterations']} L-BFGS iterations, training accuracy {_pct(probe['train_accuracy']).strip()}%)",
             f"{'':<24}" + "".join(f"{name[:11]:>{8 + 8 * len(columns)}}" for name in sets),
             f"{'':<24}" + "".join(f"{'n':>8}" + "".join(f"{t:>8}" for t, _ in columns) for _ in sets)]

    def row(label: str, dim: str | None, group: str | None) -> str:
        cells = ""
        for name in sets:
            metrics = [in_set(sc[scorer], name) for _, scorer in columns]
            if dim is not None:
                metrics = [m["breakdowns"][dim].get(group, {}) for m in metrics]
            cells += f"{metrics[0].get('n', 0):>8}" + "".join(f"{_pct(m.get('accuracy')):>8}" for m in metrics)
        return f"{label[:23]:<24}{cells}"

    lines.append(row("all items", None, None))
    for dim in ("class", "word"):
        groups = list(sc["model_verse"]["breakdowns"][dim])
        if dim == "word":
            groups.sort(key=lambda w: -sc["model_verse"]["breakdowns"]["word"][w]["n"])
        lines += [row(f"{dim} {group}", dim, group) for group in groups]
    return lines


def format_class_head(head: dict[str, Any]) -> list[str]:
    model, majority = head["model"], head["majority_class"]
    lines = [f"{'class head (mask token -> type)':<32}{'n':>7}{'head':>8}{'major.':>8}   "
             f"(majority class: {majority['class']})",
             f"{'all connectives':<32}{model['n']:>7}{_pct(model['accuracy']):>8}{_pct(majority['accuracy']):>8}"]
    if "sets" in model:
        conj, base = model["sets"]["conjunctive"], majority["sets"]["conjunctive"]
        lines.append(f"{'conjunctive uses':<32}{conj['n']:>7}{_pct(conj['accuracy']):>8}{_pct(base['accuracy']):>8}")
    for label, group in model["breakdowns"]["class"].items():
        base = majority["breakdowns"]["class"].get(label, {}).get("accuracy")
        lines.append(f"{label:<32}{group['n']:>7}{_pct(group['accuracy']):>8}{_pct(base):>8}")
    labels = head["labels"]
    lines += ["", f"{'confusion (rows: true class)':<32}" + "".join(f"{c[:8]:>12}" for c in labels)]
    for label, row in zip(labels, head["confusion"]["matrix"]):
        lines.append(f"{label:<32}" + "".join(f"{v:>12.1f}" for v in row))
    return lines


def write_plots(result: dict[str, Any], out_dir: Path, min_items: int = 20) -> list[Path]:
    """Four PNGs (five with a class head); matplotlib is imported here, with the Agg backend, so the metrics never
    need a display. The hardest-connectives plot shows the words with at least `min_items` cloze items."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError("matplotlib is needed for the plots (pip install matplotlib); or pass --no-plots") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    nt, sc = result["next_token"], result["cloze"]["scorers"]
    title_tail = f"{result['corpus']} {result['split']}, step {result['step']}"
    series = [("next token (model)", nt), ("cloze, whole verse (model)", sc["model_verse"]),
              ("cloze, suffix only (model)", sc["model_suffix"]), ("cloze, KN trigram", sc["kn3_verse"]),
              ("cloze, majority", sc["majority"])]
    paths = [plot_hardest_connectives(plt, result, out_dir / "hardest_connectives.png", min_items),
             _plot_clause_length(plt, result, series, out_dir / "accuracy_by_clause_length.png", title_tail),
             _plot_confusion(plt, result, out_dir / "confusion.png", title_tail),
             _plot_genre(plt, result, series, out_dir / "accuracy_by_genre.png", title_tail)]
    if "class_head" in result:
        paths.append(_plot_class_head(plt, result["class_head"], out_dir / "class_head_confusion.png", title_tail))
    return paths


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_clause_length(plt, result: dict[str, Any], series: list, path: Path, title_tail: str) -> Path:
    """Accuracy vs clause length; each series a little apart on x, so the intervals do not hide each other."""
    nt, sc = result["next_token"], result["cloze"]["scorers"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    buckets = [b for b in CLAUSE_LABELS if b in sc["model_verse"]["breakdowns"]["clause_length"]
               or b in nt["breakdowns"]["clause_length"]]
    x = np.arange(len(buckets))
    shift = 0.05 * (np.arange(len(series)) - (len(series) - 1) / 2)
    for k, (label, metric) in enumerate(series):
        values, counts = _group_values(metric, "clause_length", buckets)
        ax.errorbar(x + shift[k], 100 * values, yerr=100 * _errors(values, counts), marker="o", ms=5, capsize=3,
                    lw=1.3, elinewidth=0.8, label=label)
    counts = [sc["model_verse"]["breakdowns"]["clause_length"].get(b, {}).get("n", 0) for b in buckets]
    ax.set_xticks(x, [f"{b}\n(n={c})" for b, c in zip(buckets, counts)])
    _percent_axis(ax)
    clause_mode = result.get("clause_length_mode", "preceding")
    ax.set_xlabel(f"clause length in tokens (masking.clause_length = {clause_mode}; n = cloze items)")
    ax.set_ylabel("accuracy (Wilson 95% interval over items)")
    ax.set_title(f"Accuracy vs clause length — {title_tail}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the data
    return _save(plt, fig, path)


def _plot_confusion(plt, result: dict[str, Any], path: Path, title_tail: str) -> Path:
    """The cloze confusion matrix, row-normalised, over the connectives that occur as answers or predictions."""
    labels = result["cloze"]["confusion"]["labels"]
    matrix = np.array(result["cloze"]["confusion"]["matrices"]["model_verse"])
    used = np.flatnonzero((matrix.sum(axis=1) > 0) | (matrix.sum(axis=0) > 0))
    sub = matrix[np.ix_(used, used)]
    rows = sub.sum(axis=1, keepdims=True)
    norm = np.divide(sub, rows, out=np.zeros_like(sub), where=rows > 0)
    size = 0.38 * len(used) + 2.5
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = [labels[i] for i in used]
    ax.set_xticks(range(len(used)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(used)), [f"{labels[i]} ({int(round(rows[k, 0]))})" for k, i in enumerate(used)])
    ax.set_xlabel("predicted connective (whole-verse score)")
    ax.set_ylabel("true connective (items)")
    ax.set_title(f"Cloze confusion, rows normalised — {title_tail}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    return _save(plt, fig, path)


def _plot_genre(plt, result: dict[str, Any], series: list, path: Path, title_tail: str) -> Path:
    sc = result["cloze"]["scorers"]
    genres = list(sc["model_verse"]["breakdowns"]["genre"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(genres))
    width = 0.8 / len(series)
    for k, (label, metric) in enumerate(series):
        values, counts = _group_values(metric, "genre", genres)
        ax.bar(x + (k - (len(series) - 1) / 2) * width, 100 * values, width=width, label=label,
               yerr=100 * _errors(values, counts), error_kw={"capsize": 2, "lw": 0.7})
    counts = [sc["model_verse"]["breakdowns"]["genre"][g]["n"] for g in genres]
    ax.set_xticks(x, [f"{g}\n(n={c})" for g, c in zip(genres, counts)])
    _percent_axis(ax)
    ax.set_xlabel("genre (n = cloze items)")
    ax.set_ylabel("accuracy (Wilson 95% interval over items)")
    ax.set_title(f"Accuracy by genre — {title_tail}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(plt, fig, path)


def _plot_class_head(plt, head: dict[str, Any], path: Path, title_tail: str) -> Path:
    """The class head's confusion matrix, row-normalised."""
    matrix = np.array(head["confusion"]["matrix"])
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    labels = head["labels"]
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), [f"{c} ({int(round(r))})" for c, r in zip(labels, rows[:, 0])])
    for (i, j), share in np.ndenumerate(norm):
        ax.text(j, i, f"{100 * share:.0f}%", ha="center", va="center", color="white" if share > 0.5 else "black")
    ax.set_xlabel("predicted class (class head)")
    ax.set_ylabel("true class (held-out connectives)")
    ax.set_title(f"Class head: {100 * head['model']['accuracy']:.1f}% (majority "
                 f"{100 * head['majority_class']['accuracy']:.1f}%) — {title_tail}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    return _save(plt, fig, path)


def wilson(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion `accuracy` over `n` items: unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0% or 100%."""
    if n <= 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _errors(values: list[float], counts: list[int]) -> np.ndarray:
    """matplotlib's (2, N) error bar lengths below and above each value: its Wilson interval."""
    bounds = np.array([wilson(v, n) for v, n in zip(values, counts)]).reshape(-1, 2)
    return np.clip(np.stack([np.array(values) - bounds[:, 0], bounds[:, 1] - np.array(values)]), 0, None)


def _group_values(metric: dict[str, Any], dim: str, groups: list[str]) -> tuple[np.ndarray, list[int]]:
    """A breakdown's accuracy per group (nan where the metric has no such group) and its own item counts."""
    table = metric["breakdowns"][dim]
    values = np.array([table.get(g, {}).get("accuracy", np.nan) for g in groups], dtype=np.float64)
    return values, [table.get(g, {}).get("n", 0) for g in groups]


def _percent_axis(ax) -> None:
    """An accuracy axis from 0% to 100%, as the other figures draw it."""
    from matplotlib.ticker import PercentFormatter

    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))


def percent_ticks(top: float, most: int = 5) -> tuple[np.ndarray, list[str]]:
    """At most `most` round ticks from 0 to `top` (a share), in whole percents where the step allows: a narrow
    panel keeps its labels apart."""
    steps = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5)
    step = next((st for st in steps if top / st < most), 0.5)
    ticks = np.arange(0.0, top + 1e-12, step)
    digits = 0 if step >= 0.01 else 1
    return ticks, [f"{100 * t:.{digits}f}%" for t in ticks]


def hardest_words(result: dict[str, Any], min_items: int = 20) -> list[str]:
    """The connectives with at least `min_items` cloze items, lowest cloze recall first (more items first among
    equals)."""
    by_word = result["cloze"]["scorers"]["model_verse"]["breakdowns"]["word"]
    return sorted((w for w in by_word if by_word[w]["n"] >= min_items),
                  key=lambda w: (by_word[w]["accuracy"], -by_word[w]["n"]))


def plot_hardest_connectives(plt, result: dict[str, Any], path: Path, min_items: int = 20) -> Path:
    """Per connective with at least `min_items` cloze items, hardest first: cloze recall (whole-verse score) with the
    KN trigram's per-word recall and the majority and KN trigram cloze accuracies drawn as baselines (left), and the
    next-token accuracy on its own scale, values written beside the bars (right); Wilson 95% intervals as error
    bars."""
    from matplotlib.ticker import PercentFormatter

    nt, sc = result["next_token"], result["cloze"]["scorers"]
    by_word, next_by_word = sc["model_verse"]["breakdowns"]["word"], nt["breakdowns"]["word"]
    kn_by_word = sc["kn3_verse"]["breakdowns"]["word"]
    words = hardest_words(result, min_items)
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(11, 0.34 * max(len(words), 3) + 2.2),
                                      gridspec_kw={"width_ratios": [3, 2]})
    y = np.arange(len(words))
    cloze = [by_word[w]["accuracy"] for w in words]
    left.barh(y, cloze, height=0.6, color="tab:blue", label="model, whole-verse score",
              xerr=_errors(cloze, [by_word[w]["n"] for w in words]), error_kw={"capsize": 2, "lw": 0.8})
    left.scatter([kn_by_word.get(w, {}).get("accuracy", np.nan) for w in words], y, marker="x", color="black",
                 zorder=3, label="KN trigram (this word)")
    for name, key, style in (("majority connective", "majority", ":"), ("KN trigram", "kn3_verse", "--")):
        acc = sc[key]["accuracy"]
        left.axvline(acc, color="tab:red", ls=style, lw=1, label=f"{name}, all items: {100 * acc:.1f}%")
    left.set_yticks(y, [f"{w} (n={by_word[w]['n']})" for w in words])
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.set_xlabel("cloze recall (Wilson 95% interval)")
    left.set_ylabel("connective (cloze items)")
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.1), ncols=2, frameon=False)  # under the data
    left.xaxis.set_major_formatter(PercentFormatter(1.0))
    nxt = [next_by_word.get(w, {}).get("accuracy", 0.0) for w in words]
    errors = _errors(nxt, [next_by_word.get(w, {}).get("n", 0) for w in words])
    right.barh(y, nxt, height=0.6, color="tab:orange", xerr=errors, error_kw={"capsize": 2, "lw": 0.8})
    top = max([v + e for v, e in zip(nxt, errors[1])] or [0.01])
    right.set_xlim(0, min(1.0, top * 1.35) or 0.01)
    for k, v in enumerate(nxt):
        right.text(v + errors[1][k] + top * 0.02, k, f"{100 * v:.1f}%", va="center", fontsize=7)
    right.set_xticks(*percent_ticks(right.get_xlim()[1]))
    right.set_xlabel("next-token accuracy, all pieces (own scale)")
    shown, total = len(words), len(by_word)
    fig.suptitle(f"Hardest connectives first: n >= {min_items} cloze items ({shown} of {total} words) — "
                 f"{result['corpus']} {result['split']}, step {result['step']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(result: dict[str, Any], path: Path) -> None:
    """Atomic, so a reader (or an interrupted comparison) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=1))
