"""Write docs/concepts.svg, the diagram of docs/concepts.md: hand-built SVG, standard library only.

    python docs/make_diagram.py

Top row: one episode (the inner loop). Bottom row: what the outer loop makes of it. tests/test_docs.py checks that
the committed SVG is this script's output and well-formed XML.
"""

from pathlib import Path
from xml.sax.saxutils import escape

OUT = Path(__file__).resolve().parent / "concepts.svg"
WIDTH, HEIGHT = 1100, 400
BOX_W, BOX_H = 150, 58
COLUMNS = [20 + 230 * i for i in range(5)]  # left edge of each column's box
TOP, BOTTOM = 90, 270  # top edge of each row's boxes
EPISODE, OUTER, MEMORY = "#e8f0fb", "#fdf1e3", "#e6f5e9"  # box fills: episode, outer loop, fast weights

# name: (column, row top, fill, title, subtitle)
BOXES = {
    "source": (0, TOP, EPISODE, "stream / tools", "chunks, tool results"),
    "context": (1, TOP, EPISODE, "working context", "grows as it reads"),
    "extract": (2, TOP, EPISODE, "extraction action", "grounded QA pairs"),
    "inner": (3, TOP, MEMORY, "inner loop", "SGD on B, answer tokens"),
    "fast": (4, TOP, MEMORY, "fast weights", "B A on last 4 layers' FFN"),
    "answer": (4, BOTTOM, EPISODE, "answer", "base + fast weights"),
    "reward": (3, BOTTOM, OUTER, "reward", "the environment's score"),
    "outer": (2, BOTTOM, OUTER, "outer loop", "GRPO / PPO"),
    "slow": (1, BOTTOM, OUTER, "slow weights", "the policy"),
}


def _box(name: str) -> tuple[int, int]:
    column, top, *_ = BOXES[name]
    return COLUMNS[column], top


def _text(x: float, y: float, text: str, size: int = 13, weight: str = "normal", anchor: str = "middle",
          fill: str = "#222") -> str:
    return (f'<text x="{x:g}" y="{y:g}" font-size="{size}" font-weight="{weight}" text-anchor="{anchor}" '
            f'fill="{fill}">{escape(text)}</text>')


def _arrow(points: list[tuple[float, float]], label: str = "", at: tuple[float, float] | None = None,
           dashed: bool = False) -> list[str]:
    path = " ".join(f"{'M' if i == 0 else 'L'} {x:g} {y:g}" for i, (x, y) in enumerate(points))
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    out = [f'<path d="{path}" fill="none" stroke="#444" stroke-width="1.6"{dash} marker-end="url(#head)"/>']
    if label:
        x, y = at or ((points[0][0] + points[-1][0]) / 2, (points[0][1] + points[-1][1]) / 2 - 8)
        out.append(_text(x, y, label, size=11, fill="#555"))
    return out


def diagram() -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif">',
        "<title>TMEM: the inner loop inside an episode, the outer loop across episodes</title>",
        '<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#444"/></marker></defs>',
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        _text(20, 28, "episode: the agent reads or acts; its fast weights start at B = 0 and accumulate", size=14,
              weight="bold", anchor="start"),
        _text(20, BOTTOM + 24, "outer loop: one step", size=14, weight="bold", anchor="start"),
        _text(20, BOTTOM + 43, "over many episodes", size=14, weight="bold", anchor="start"),
    ]
    for column, top, fill, title, subtitle in BOXES.values():
        x = COLUMNS[column]
        parts.append(f'<rect x="{x}" y="{top}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="{fill}" '
                     'stroke="#333" stroke-width="1.2"/>')
        parts.append(_text(x + BOX_W / 2, top + 24, title, weight="bold"))
        parts.append(_text(x + BOX_W / 2, top + 43, subtitle, size=11, fill="#444"))

    def right(name):  # middle of the right edge
        x, y = _box(name)
        return x + BOX_W, y + BOX_H / 2

    def left(name):
        x, y = _box(name)
        return x, y + BOX_H / 2

    mid_top = TOP + BOX_H / 2
    # The episode, left to right.
    parts += _arrow([right("source"), left("context")], "read / act")
    parts += _arrow([right("context"), left("extract")], "over L_max")
    parts += _arrow([right("extract"), left("inner")], "QA pairs")
    parts += _arrow([right("inner"), left("fast")], "update B")
    # After the update the working context is cleared: a dashed loop back over the top row.
    x_inner, _ = _box("inner")
    x_context, _ = _box("context")
    parts += _arrow([(x_inner + BOX_W / 2, TOP), (x_inner + BOX_W / 2, TOP - 22),
                     (x_context + BOX_W / 2, TOP - 22), (x_context + BOX_W / 2, TOP)],
                    "then clear the context", at=((x_inner + x_context + BOX_W) / 2, TOP - 28), dashed=True)
    # Fast weights are live for every later extraction and for the answer.
    x_fast, _ = _box("fast")
    parts += _arrow([(x_fast + BOX_W / 2, TOP + BOX_H), (x_fast + BOX_W / 2, BOTTOM)], "live",
                    at=(x_fast + BOX_W / 2 + 22, (TOP + BOX_H + BOTTOM) / 2 + 4))
    # The outer loop, right to left.
    parts += _arrow([left("answer"), right("reward")], "score")
    parts += _arrow([left("reward"), right("outer")], "advantages")
    parts += _arrow([left("outer"), right("slow")], "gradient")
    # The slow weights are the policy that writes every extraction and answer.
    x_slow, _ = _box("slow")
    x_extract, _ = _box("extract")
    parts += _arrow([(x_slow + BOX_W / 2, BOTTOM), (x_slow + BOX_W / 2, mid_top + 80),
                     (x_extract + BOX_W / 2, mid_top + 80), (x_extract + BOX_W / 2, TOP + BOX_H)],
                    "the policy writes extractions and answers", at=((x_slow + x_extract + BOX_W) / 2, mid_top + 74),
                    dashed=True)
    parts.append(_text(WIDTH / 2, HEIGHT - 24, "gradient on extraction and answer tokens, each under the fast "
                       "weights live when it was generated; none through the inner update", size=12, fill="#555"))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    OUT.write_text(diagram(), encoding="utf-8")
    print(f"wrote {OUT.name}")
