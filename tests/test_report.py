"""The reproduction report: a well-formed page whose every image is captioned and fits, verdicts
that do not judge below the budget, and a KL figure whose y axis is labelled."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from mapa_vae.experiments.report import STYLE, Report
from mapa_vae.experiments.reproduce import _fmt, _verdict, below_budget
from mapa_vae.experiments.sweep import PROFILES


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.style, self.in_style, self.stack = "", False, []
        self.figures: list[dict[str, object]] = []

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)
        if tag == "style":
            self.in_style = True
        if tag == "figure":
            self.figures.append({"img": 0, "caption": ""})
        if tag == "img":
            assert self.stack[-2] == "figure", "an image outside a figure"
            self.figures[-1]["img"] += 1  # type: ignore[operator]

    def handle_endtag(self, tag):
        self.stack.pop()
        if tag == "style":
            self.in_style = False

    def handle_data(self, data):
        if self.in_style:
            self.style += data
        elif self.stack and self.stack[-1] == "figcaption":
            self.figures[-1]["caption"] = str(self.figures[-1]["caption"]) + data


def _rules(css: str) -> dict[str, str]:
    """A strict parse of a flat stylesheet: ``selector{declarations}``, balanced, no ``{{``."""
    assert "{{" not in css and "}}" not in css, css
    rules = re.findall(r"([^{}]+)\{([^{}]*)\}", css)
    assert "".join(f"{s}{{{d}}}" for s, d in rules) == css, "unparsed text in the stylesheet"
    out = {}
    for selector, body in rules:
        for decl in body.split(";"):
            assert re.fullmatch(r"\s*([a-z-]+\s*:\s*[^:;]+)?\s*", decl), decl
        for s in selector.split(","):
            out[s.strip()] = body
    return out


def test_report_html_is_well_formed_and_every_image_captioned(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(22, 2))  # 2420 px wide at 110 dpi: wider than the page
    fig.savefig(tmp_path / "wide.png", dpi=110)
    plt.close(fig)
    rep = Report("t")
    rep.table(["claim", "verdict"], [["(d) q(i | n) tracks", "reproduced"]])
    rep.figure(tmp_path / "wide.png", "a wide figure")
    page = _Page()
    page.feed(rep.html())
    rules = _rules(page.style)
    assert "max-width:100%" in rules["img"] and "height:auto" in rules["img"]
    assert "border" in rules["td"] and "border-collapse:collapse" in rules["table"]
    assert page.figures == [{"img": 1, "caption": "a wide figure"}]
    assert page.style == STYLE
    md = rep.markdown(tmp_path)
    assert "| (d) q(i \\| n) tracks | reproduced |" in md and "*a wide figure*" in md
    with pytest.raises(ValueError, match="caption"):
        rep.figure(tmp_path / "wide.png", " ")


def test_verdicts_below_budget_are_not_judged_and_one_draw_has_no_spread():
    assert below_budget(PROFILES["tiny"]) is not None and below_budget(PROFILES["quick"]) is None
    assert _verdict(0.0, below_budget(PROFILES["tiny"])).startswith("not judged (3 epochs")
    assert _verdict(1.0) == "reproduced"
    assert _fmt({"mean": 0.5, "std": 0.0, "n": 1}) == "0.500 (1 draw)"
    assert _fmt({"mean": 0.5, "std": 0.1, "n": 3}) == "0.500 ± 0.100"


def test_kl_figure_labels_its_y_axis(tmp_path, monkeypatch):
    """A narrow KL range (one decade or less) still gets y tick labels."""
    from mapa_vae.experiments import figures

    captured = {}
    real_save = figures._save

    def save(fig, path):
        fig.canvas.draw()
        captured["labels"] = [[t.get_text() for t in ax.get_yticklabels() if t.get_text()]
                              for ax in fig.axes]
        return real_save(fig, path)

    monkeypatch.setattr(figures, "_save", save)
    summary = {("circle", "iwae", 10): {"mean": 0.31, "std": 0.01, "n": 2},
               ("circle", "iwae", 50): {"mean": 0.34, "std": 0.01, "n": 2},
               ("circle", "vae", 1): {"mean": 0.33, "std": 0.0, "n": 1}}
    figures.plot_kl_vs_samples(summary, tmp_path / "kl.png")
    assert len(captured["labels"][0]) >= 2, captured

