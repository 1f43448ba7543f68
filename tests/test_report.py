"""The HTML report (eval/report.py, sweeps/make_report.py): fast checks on hand-made experiment directories, and a
real finished sweep rendered in headless Chromium (table rows, drawn plots, sorting, no console errors, a screenshot)."""

import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, run_tiny_sweep
from eval.report import load_experiment, write_report

MAKE_REPORT = PROJECT_ROOT / "sweeps" / "make_report.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (apt-get install -y chromium)")
PARAMS = {"lora_r": {"kind": "choice", "values": [8, 16]},
          "learning_rate": {"kind": "log_uniform", "min": 1e-4, "max": 1e-2}}
CONFIG_YAML = ("training:\n  max_steps: 4\n  eval_steps: 2\n"
               "sweep:\n  early_terminate: {type: hyperband, min_iter: 1, eta: 2}\n"
               "resources:\n  gpus_per_trial: -1\n")
# What the driver saves of that config's plan: ASHA over max_steps=4 / eval_steps=2 is two evaluations per trial,
# one rung at evaluation 1; the trials got a quarter of a GPU each (gpus_per_trial -1 is "auto").
PLAN = {"metric": "eval_loss", "mode": "min", "gpus_per_trial": 0.25,
        "asha": {"enabled": True, "grace_period": 1, "reduction_factor": 2, "max_t": 2, "rungs": [1]}}


def _row(trial_id, rank, lora_r, learning_rate, status, loss, exact_match=None, heldout=None, winner=False):
    return {"trial_id": trial_id, "lora_r": lora_r, "learning_rate": learning_rate, "status": status,
            "best_eval_loss": loss, "heldout_loss": heldout, "exact_match": exact_match, "steps": 4, "tokens": 1000,
            "wall_time_s": 12.5, "peak_memory_mib": 900.0, "winner": winner, "rank": rank}


def _minimal_experiment(root: Path) -> Path:
    """A finished sweep's files without tune/ or merge_check.json: leaderboard, config, generations."""
    experiment = root / "minimal"
    (experiment / "eval").mkdir(parents=True)
    (experiment / "config.yaml").write_text(CONFIG_YAML)
    (experiment / "search_space.json").write_text(json.dumps(PARAMS))
    rows = [
        _row("aaaa0001", 1, 16, 3e-3, "completed", 0.5, 0.75, 0.55, winner=True),
        _row("aaaa0002", 2, 8, 1e-3, "completed", 0.9, 0.5, 0.95),
        _row("aaaa0003", 3, 16, 5e-4, "completed", 1.4),
        _row("aaaa0004", 4, 8, 2e-4, "completed", 2.0),
        _row("aaaa0005", 5, 8, 1e-4, "stopped by ASHA at rung 0 (evaluation 1 of 2)", 3.0),
        _row("aaaa0006", 6, 16, 8e-3, "failed: FloatingPointError: eval_loss is nan at step 2", None),
        {**_row("base", None, None, None, "base model (no adapter)", None, 0.25, 2.5), "steps": 0, "tokens": 0,
         "wall_time_s": None, "peak_memory_mib": None},
    ]
    columns = ["rank", "trial_id", "lora_r", "learning_rate", "status", "best_eval_loss", "heldout_loss", "exact_match",
               "steps", "tokens", "wall_time_s", "peak_memory_mib", "winner"]
    (experiment / "leaderboard.json").write_text(json.dumps({"title": "lorasweep leaderboard: minimal",
                                                              "columns": columns, "rows": rows}))
    prompts = ["Query: set an alarm\nIntent:", 'Query: <script>alert("x")</script>\nIntent:']
    for key, hits in (("base", [False, False]), ("aaaa0001", [True, True]), ("aaaa0002", [True, False])):
        lines = [{"prompt": p, "target": "alarm", "generation": " alarm" if hit else " <b>nope</b>", "exact_match": hit}
                 for p, hit in zip(prompts, hits)]
        (experiment / "eval" / f"generations_{key}.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return experiment


def _tune_trial(tune_dir: Path, trial_id: str, index: int, params: dict, losses: list[float], done: bool,
                error: str | None = None) -> None:
    """A trial directory as Ray Tune writes it: params.json, result.json with a line per evaluation, error.txt."""
    trial_dir = tune_dir / f"train_qlora_trial_{trial_id}_{index}_lora_r={params['lora_r']}_2026-01-01_00-00-00"
    trial_dir.mkdir(parents=True)
    (trial_dir / "params.json").write_text(json.dumps(params))
    lines = [{"eval_loss": loss, "evaluation": i, "step": 2 * i, "tokens": 100 * i, "wall_time_s": 5.0 * i,
              "peak_memory_mib": 800.0, "done": done and i == len(losses), "trial_id": trial_id, "config": params}
             for i, loss in enumerate(losses, start=1)]
    (trial_dir / "result.json").write_text("".join(json.dumps(l) + "\n" for l in lines))
    if error:
        (trial_dir / "error.txt").write_text(f"Failure # 1 (occurred at 2026-01-01_00-00-05)\nTraceback ...\n{error}\n")


def test_report_of_a_minimal_experiment_is_self_contained(tmp_path):
    experiment = _minimal_experiment(tmp_path)
    report = write_report(experiment)
    assert report == experiment / "report.html"
    assert [p.name for p in experiment.iterdir() if p.name.startswith(".report-")] == []  # the temp file was renamed
    page = report.read_text()
    for trial_id in [f"aaaa000{i}" for i in range(1, 7)] + ["base"]:
        assert f'data-trial="{trial_id}"' in page
    links = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.IGNORECASE)
    assert links and all(link.startswith("#") for link in links), links
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<img" not in page
    # text from the run is escaped, never interpreted
    assert '<script>alert("x")' not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<b>nope</b>" not in page and "&lt;b&gt;nope&lt;/b&gt;" in page
    assert "No tune/ directory" in page and "No merge_check.json" in page
    assert "FloatingPointError: eval_loss is nan at step 2" in page
    assert 'id="importance"' in page  # four completed trials: enough for Optuna's importance
    assert 'id="parallel-coordinates"' in page and 'id="scatter-exact_match-learning_rate"' in page
    assert "1/2 exact" in page and "2/2 exact" in page and "0/2 exact" in page


def test_importance_is_skipped_with_too_few_completed_trials(tmp_path):
    experiment = _minimal_experiment(tmp_path)
    board = json.loads((experiment / "leaderboard.json").read_text())
    board["rows"] = [r for r in board["rows"] if r["trial_id"] not in ("aaaa0003", "aaaa0004")]
    (experiment / "leaderboard.json").write_text(json.dumps(board))
    page = write_report(experiment).read_text()
    assert 'id="importance"' not in page and "needs at least 4 completed trials; this sweep has 2" in page


def test_interrupted_sweep_rows_come_from_tune_results(tmp_path):
    experiment = tmp_path / "interrupted"
    tune_dir = experiment / "tune"
    tune_dir.mkdir(parents=True)
    (experiment / "config.yaml").write_text(CONFIG_YAML)
    (experiment / "plan.json").write_text(json.dumps(PLAN))
    (experiment / "search_space.json").write_text(json.dumps(PARAMS))
    _tune_trial(tune_dir, "bbbb0001", 1, {"lora_r": 8, "learning_rate": 1e-3}, [2.0, 1.0], done=True)
    _tune_trial(tune_dir, "bbbb0002", 2, {"lora_r": 16, "learning_rate": 2e-4}, [3.0], done=True)
    _tune_trial(tune_dir, "bbbb0003", 3, {"lora_r": 8, "learning_rate": 5e-3}, [2.5], done=False)
    _tune_trial(tune_dir, "bbbb0004", 4, {"lora_r": 16, "learning_rate": 9e-3}, [], done=False,
                error="RuntimeError: CUDA out of memory")
    (tune_dir / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")  # Tune's own files are ignored

    exp = load_experiment(experiment)
    statuses = {r["trial_id"]: r["status"] for r in exp.rows}
    assert statuses == {
        "bbbb0001": "completed",
        "bbbb0002": "stopped by ASHA at rung 0 (evaluation 1 of 2)",
        "bbbb0003": "unfinished: interrupted after evaluation 1 of 2",
        "bbbb0004": "failed: RuntimeError: CUDA out of memory",
    }
    assert [r["trial_id"] for r in exp.rows][0] == "bbbb0001" and exp.rows[0]["best_eval_loss"] == 1.0
    page = write_report(experiment).read_text()
    assert "No leaderboard.json" in page and "No eval/ directory" in page
    assert page.count('class="stop-mark"') == 1  # the ASHA-stopped trial; the unfinished one is not marked
    assert "eval loss (log scale)" in page  # losses 1.0-3.0 on a log axis: ticks at 1, 2 and 3
    assert all(f'class="tick">{v}</text>' in page for v in ("1", "2", "3"))


def test_cost_table_uses_the_gpu_share_the_trials_got_not_the_configs_auto(tmp_path):
    """config.yaml says gpus_per_trial: -1 (auto); plan.json holds the share auto mode chose, 0.25."""
    experiment = _minimal_experiment(tmp_path)
    (experiment / "plan.json").write_text(json.dumps(PLAN))
    page = write_report(experiment).read_text()
    cost = page[page.index('id="cost"'):page.index("</table>", page.index('id="cost"'))]
    assert "<th>GPU-seconds</th>" in cost and "GPU-seconds were not recorded" not in page
    assert cost.count('<td data-v="3.125">3.125</td>') == 6  # 12.5 s of wall time x 0.25 GPU, every trial
    (experiment / "plan.json").unlink()  # an experiment without the plan: nothing is made up
    assert "GPU-seconds were not recorded" in write_report(experiment).read_text()


def test_report_states_the_selection_and_warns_when_the_winner_is_no_better_than_the_base(tmp_path):
    experiment = _minimal_experiment(tmp_path)
    board = json.loads((experiment / "leaderboard.json").read_text())
    board["rows"][0].update(exact_match_ci_low=0.2, exact_match_ci_high=0.95)
    board["selection_notes"] = ["WARNING: the winner aaaa0001 is NOT better than the base model on exact_match.",
                                "Winner aaaa0001 against runner-up aaaa0002 on exact_match: a tie within noise."]
    board["metadata"] = {"written_utc": "2026-12-02T00:00:00+00:00", "config_sha256": "ab" * 32,
                         "versions": {"python": "3.11.9", "torch": "9.9.9"}}
    (experiment / "leaderboard.json").write_text(json.dumps(board))
    page = write_report(experiment).read_text()
    summary = page[page.index('id="summary"'):page.index('id="leaderboard"')]
    assert '<p class="warn loud">WARNING: the winner aaaa0001 is NOT better than the base model' in summary
    assert "a tie within noise" in summary
    assert "exact match 0.750 (95% CI 0.200-0.950)" in summary  # one unit: the leaderboard's fraction
    assert "%" not in page[page.index('id="leaderboard"'):page.index('id="curves"')]
    assert "<td>9.9.9</td>" in page and "ab" * 32 in page  # the run's versions and config hash, not this process's


def test_every_generation_is_shown_with_an_errors_only_filter_and_accuracy_per_label(tmp_path):
    experiment = _minimal_experiment(tmp_path)
    labels = ["alarm", "balance", "timer"]
    for key, wrong in (("base", set(range(30))), ("aaaa0001", {3, 4, 5}), ("aaaa0002", {0, 1, 2, 3})):
        lines = [{"prompt": f"Query: q{i}\nIntent:", "target": labels[i % 3],
                  "generation": "nope" if i in wrong else labels[i % 3], "exact_match": i not in wrong}
                 for i in range(30)]
        (experiment / "eval" / f"generations_{key}.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    page = write_report(experiment).read_text()
    table = page[page.index('<table id="generations-table"'):page.index("</table>", page.index('<table id="generations-table"'))]
    assert table.count("<tr data-error=") == 30  # every prompt, not the first 20
    assert table.count('<tr data-error="1">') == 3  # the winner's misses: prompts 3, 4 and 5
    assert 'id="errors-only" data-table="generations-table"' in page and "the 3 of 30 prompts the winner" in page
    per_label = page[page.index('id="per-label"'):page.index("</table>", page.index('id="per-label"'))]
    rows = re.findall(r'<tr><td data-v="(\w+)">\w+</td><td class="num" data-v="10">10</td>(.*?)</tr>', per_label)
    cells = {label: re.findall(r"\((\d+)/10\)", row) for label, row in rows}
    # base, winner, runner-up: the winner missed prompts 3, 4, 5 (one per label), the runner-up 0-3 (alarm twice)
    assert cells == {"alarm": ["0", "9", "8"], "balance": ["0", "9", "9"], "timer": ["0", "9", "9"]}
    assert '<td class="num" data-v="0.800000">0.800 <small>(8/10)</small></td>' in per_label
    # free-text targets (one per prompt): no per-label table
    for key in ("base", "aaaa0001", "aaaa0002"):
        lines = [{"prompt": f"p{i}", "target": f"answer {i}", "generation": "x", "exact_match": False} for i in range(6)]
        (experiment / "eval" / f"generations_{key}.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    assert 'id="per-label"' not in write_report(experiment).read_text()


def test_every_trial_gets_its_own_colour():
    from eval.report import PALETTE, trial_colors

    colors = trial_colors([f"t{i}" for i in range(40)])
    assert len(set(colors.values())) == 40 and list(colors.values())[:10] == PALETTE
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colors.values())


def test_cli_refuses_a_directory_that_is_not_an_experiment(tmp_path):
    proc = subprocess.run([sys.executable, str(MAKE_REPORT), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and "not a lorasweep experiment directory" in proc.stderr
    assert not (tmp_path / "report.html").exists()


# -------------------------------------------------------------------------------- a real sweep in Chromium


class _Node:
    def __init__(self, tag: str, attrs: list, parent):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def iter(self, tag: str | None = None):
        if tag is None or self.tag == tag:
            yield self
        for child in self.children:
            yield from child.iter(tag)

    def by_id(self, element_id: str) -> "_Node":
        return next(n for n in self.iter() if n.attrs.get("id") == element_id)


class _DomParser(HTMLParser):
    """The serialized DOM Chromium dumps, as a tree of tags and attributes (text is not kept)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__()
        self.root = self.current = _Node("#document", [], None)

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, attrs, self.current)
        self.current.children.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(_Node(tag, attrs, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.current = node.parent


def _parse_dom(text: str) -> _Node:
    parser = _DomParser()
    parser.feed(text)
    return parser.root


def _chromium(page: Path, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local file with a fresh profile, nothing fetched, console messages on stderr."""
    with tempfile.TemporaryDirectory(prefix="lorasweep-chromium-") as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *flags, page.as_uri()],
            capture_output=True, text=True, timeout=180)


def _console_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def relocated_sweep(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """A finished two-trial sweep, moved to another directory: the report must not need its original paths."""
    experiment, _ = run_tiny_sweep(tiny_model_dir, tiny_data_dir, tmp_path_factory.mktemp("runs"), "report")
    moved = tmp_path_factory.mktemp("copied") / "report-copy"
    shutil.copytree(experiment, moved)
    shutil.rmtree(experiment)
    return moved


@pytest.fixture(scope="module")
def rendered(relocated_sweep, tmp_path_factory):
    """make_report.py on the sweep, then Chromium: the DOM after the page's script ran, and a screenshot."""
    proc = subprocess.run([sys.executable, str(MAKE_REPORT), str(relocated_sweep)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = Path(proc.stdout.strip())
    assert report == relocated_sweep.resolve() / "report.html" and report.is_file()
    dom = _chromium(report, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    screenshot = tmp_path_factory.mktemp("artifacts") / "report.png"
    shot = _chromium(report, f"--screenshot={screenshot}", "--window-size=1400,3000", "--hide-scrollbars")
    assert shot.returncode == 0, shot.stderr[-3000:]
    return {"report": report, "dom": dom, "tree": _parse_dom(dom.stdout), "screenshot": screenshot}


@needs_chromium
@pytest.mark.sweep
def test_rendered_report_shows_every_trial_and_draws_the_plots(rendered, relocated_sweep):
    tree = rendered["tree"]
    board = json.loads((relocated_sweep / "leaderboard.json").read_text())
    rows = list(tree.by_id("leaderboard").iter("tbody"))[0].children
    assert [r.attrs.get("data-trial") for r in rows] == [r["trial_id"] for r in board["rows"]]
    assert len(rows) == 3  # two trials and the base model

    curves = tree.by_id("loss-curves")
    lines = [p for p in curves.iter("path") if "curve" in p.attrs.get("class", "")]
    assert len(lines) == 2 and all(re.match(r"M[\d.]+,[\d.]+", p.attrs.get("d", "")) for p in lines)
    evaluations = sum(len((d / "result.json").read_text().splitlines())
                      for d in (relocated_sweep / "tune").iterdir() if (d / "result.json").is_file())
    points = list(curves.iter("circle"))
    assert len(points) == evaluations and all(float(c.attrs["cx"]) > 0 and float(c.attrs["cy"]) > 0 for c in points)
    assert len([p for p in curves.iter("path") if "stop-mark" in p.attrs.get("class", "")]) == 1  # ASHA's cut

    parallel = tree.by_id("parallel-coordinates")
    assert len([p for p in parallel.iter("path") if p.attrs.get("d")]) == 2
    scatters = [s for s in tree.iter("svg") if s.attrs.get("id", "").startswith("scatter-")]
    assert scatters and all(list(s.iter("circle")) for s in scatters)

    assert list(tree.by_id("generations").iter("tr"))  # base model and winner side by side
    assert list(tree.by_id("merge-check").iter("tr"))


@needs_chromium
@pytest.mark.sweep
def test_rendered_report_has_no_script_errors(rendered):
    html_element = next(rendered["tree"].iter("html"))
    assert html_element.attrs.get("data-js-ready") == "true"  # the page's script ran to its end
    assert "data-js-errors" not in html_element.attrs, html_element.attrs.get("data-js-errors")
    assert _console_lines(rendered["dom"]) == []


@needs_chromium
@pytest.mark.sweep
def test_the_page_lays_out_every_leaderboard_row_and_plot_on_screen(rendered, relocated_sweep):
    """What the screenshot shows, measured: a page beside the report reads the laid-out boxes in an iframe of
    the screenshot's width; every leaderboard row is on screen with its trial id and status as text, and the
    plots have their drawn size. The screenshot itself stays for people to look at."""
    harness = rendered["report"].with_name("layout_check.html")
    harness.write_text("""<!DOCTYPE html><html><body style="margin:0">
<iframe id="page" src="report.html" style="width:1400px;height:3000px;border:0"></iframe><script>
document.getElementById('page').addEventListener('load', function () {
  var doc = this.contentDocument, out = [];
  doc.querySelectorAll('#leaderboard tbody tr').forEach(function (row) {
    var box = row.getBoundingClientRect(), style = doc.defaultView.getComputedStyle(row);
    out.push({trial: row.dataset.trial, width: box.width, height: box.height, top: box.top,
              visible: style.display !== 'none' && style.visibility !== 'hidden',
              text: row.innerText});
  });
  var plots = Array.from(doc.querySelectorAll('svg.plot')).map(function (svg) {
    var box = svg.getBoundingClientRect(); return {id: svg.id, width: box.width, height: box.height};
  });
  document.body.dataset.layout = JSON.stringify({rows: out, plots: plots});
});
</script></body></html>""")
    try:
        proc = _chromium(harness, "--dump-dom", "--allow-file-access-from-files", "--window-size=1400,3000")
    finally:
        harness.unlink()
    layout = json.loads(next(_parse_dom(proc.stdout).iter("body")).attrs["data-layout"])
    board = json.loads((relocated_sweep / "leaderboard.json").read_text())["rows"]
    assert [r["trial"] for r in layout["rows"]] == [r["trial_id"] for r in board]
    for shown, row in zip(layout["rows"], board):
        assert shown["visible"] and shown["width"] > 600 and shown["height"] >= 15 and 0 < shown["top"] < 3000, shown
        assert row["trial_id"] in shown["text"] and row["status"].split(" (")[0] in shown["text"], shown
    assert {p["id"] for p in layout["plots"]} >= {"loss-curves", "parallel-coordinates"}
    assert all(p["width"] >= 300 and p["height"] >= 200 for p in layout["plots"]), layout["plots"]

    data = rendered["screenshot"].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", data[16:24])  # the PNG's IHDR: the window it was drawn in
    assert (width, height) == (1400, 3000)
    print(f"\nreport screenshot: {rendered['screenshot']}")


@needs_chromium
@pytest.mark.sweep
def test_clicking_a_header_sorts_the_leaderboard(rendered):
    # A page beside the report clicks the header in an iframe and records the row order after each click.
    harness = rendered["report"].with_name("sort_check.html")
    harness.write_text("""<!DOCTYPE html><html><body><iframe id="page" src="report.html"></iframe><script>
document.getElementById('page').addEventListener('load', function () {
  var doc = this.contentDocument, orders = [];
  var header = Array.from(doc.querySelectorAll('#leaderboard thead th'))
    .find(function (th) { return th.textContent === 'best_eval_loss'; });
  for (var i = 0; i < 2; i++) {
    header.click();
    orders.push(Array.from(doc.querySelectorAll('#leaderboard tbody tr')).map(function (r) { return r.dataset.trial; }).join(','));
  }
  document.body.dataset.orders = orders.join(' ');
});
</script></body></html>""")
    try:
        proc = _chromium(harness, "--dump-dom", "--allow-file-access-from-files")
    finally:
        harness.unlink()
    body = next(_parse_dom(proc.stdout).iter("body"))
    ascending, descending = body.attrs["data-orders"].split(" ")
    rows = json.loads((rendered["report"].parent / "leaderboard.json").read_text())["rows"]
    by_loss = [r["trial_id"] for r in sorted((r for r in rows if r["best_eval_loss"] is not None),
                                              key=lambda r: r["best_eval_loss"])]
    # the base model has no eval loss: last in both directions
    assert ascending.split(",") == by_loss + ["base"]
    assert descending.split(",") == by_loss[::-1] + ["base"]


@needs_chromium
def test_errors_only_hides_the_prompts_the_winner_answered(tmp_path):
    """In Chromium: ticking the box leaves the rows of the winner's misses on screen, unticking brings all back."""
    experiment = _minimal_experiment(tmp_path)
    for key, wrong in (("base", set(range(25))), ("aaaa0001", {2, 7, 11}), ("aaaa0002", {1})):
        lines = [{"prompt": f"q{i}", "target": "alarm", "generation": "x" if i in wrong else "alarm",
                  "exact_match": i not in wrong} for i in range(25)]
        (experiment / "eval" / f"generations_{key}.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    write_report(experiment)
    harness = experiment / "filter_check.html"
    harness.write_text("""<!DOCTYPE html><html><body><iframe id="page" src="report.html"></iframe><script>
document.getElementById('page').addEventListener('load', function () {
  var doc = this.contentDocument, box = doc.getElementById('errors-only'), counts = [];
  var visible = function () {
    return Array.from(doc.querySelectorAll('#generations-table tbody tr')).filter(function (r) {
      return doc.defaultView.getComputedStyle(r).display !== 'none'; }).map(function (r) { return r.cells[0].textContent; });
  };
  counts.push(visible().join(','));
  box.click(); counts.push(visible().join(','));
  box.click(); counts.push(String(visible().length));
  document.body.dataset.counts = counts.join(' ');
});
</script></body></html>""")
    proc = _chromium(harness, "--dump-dom", "--allow-file-access-from-files")
    before, ticked, unticked = next(_parse_dom(proc.stdout).iter("body")).attrs["data-counts"].split(" ")
    assert before == ",".join(str(i) for i in range(1, 26))
    assert ticked == "3,8,12"  # prompts 2, 7 and 11, numbered from 1
    assert unticked == "25"


@needs_chromium
def test_console_check_sees_script_errors(tmp_path):
    """The no-errors check above is only worth something if it catches an error."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    lines = _console_lines(_chromium(page, "--dump-dom"))
    assert any("undefinedFunction is not defined" in line for line in lines), lines
