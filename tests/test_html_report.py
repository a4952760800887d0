"""report.html / report.md: self-contained, escaped, and working in a real headless browser."""

import json
import re
import shutil
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from llm_audit.cli import main
from llm_audit.report.figures import make_figures

HOSTILE = [
    "layers.0.<script>alert(1)</script>.weight",
    'layers.1.q"><img src=x onerror=alert(2)>.weight',
    "layers.2.$\\frac{1}{0}$_[x](javascript:alert(3))|`.weight",
    "layers.3.plain.weight",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Audit a checkpoint whose tensor names are hostile; one planted trap, one low-rank."""
    d = tmp_path_factory.mktemp("html")
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(128, 64, generator=g) for _ in HOSTILE]
    ws[0][3, 3] = 60.0  # a trap
    ws[2] = torch.randn(128, 2, generator=g) @ torch.randn(2, 64, generator=g) / 64 \
        + 0.0005 * torch.randn(128, 64, generator=g)  # low rank: alpha < 2, no trap
    save_file(dict(zip(HOSTILE, ws, strict=True)), d / "model.safetensors")
    out = d / "out"
    assert main([str(d / "model.safetensors"), "--out", str(out), "-q"]) == 0
    return out


def test_outputs_and_figures_beside_md(report):
    names = sorted(p.name for p in report.iterdir())
    assert names == ["figures", "layers.csv", "report.html", "report.md", "summary.json",
                     "traps.csv"]
    figs = sorted(p.name for p in (report / "figures").iterdir())
    assert figs[:2] == ["alpha_by_layer.png", "spectra_01.png"]
    md = (report / "report.md").read_text()
    for f in figs:
        assert f"](figures/{f})" in md


def test_md_and_html_show_the_same_summary_rows(report):
    from markupsafe import escape

    from llm_audit.report.fmt import code, summary_rows
    from llm_audit.summary import AuditSummary

    s = AuditSummary.from_dict(json.loads((report / "summary.json").read_text()))
    md, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    assert s.total_traps > 0 and s.revision is None
    for label, text in summary_rows(s, rule=code):
        assert f"| {label} | {text} |" in md
    for label, text in [("model", s.model), ("revision", "—"), *summary_rows(s, missing="—")]:
        assert f"<tr><th>{escape(label)}</th><td>{escape(text)}</td></tr>" in page


def test_html_is_self_contained(report):
    html = (report / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", html, re.I)
    assert "@import" not in html and "url(" not in html
    assert html.count("<script") == 1  # ours, inline
    assert html.count("data:image/png;base64,") >= 3


def test_every_header_name_is_escaped(report):
    html = (report / "report.html").read_text()
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    md = (report / "report.md").read_text()
    # names are code spans (markdown and HTML are literal text there); other text is escaped
    assert "| `layers.0.<script>alert(1)</script>.weight` |" in md
    assert "| ``layers.2.$\\frac{1}{0}$_[x](javascript:alert(3))\\|`.weight`` |" in md
    rows = [re.sub(r"(`+).*?\1", "", line) for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 + len(HOSTILE)  # flagged + all matrices; the module cells
    assert all(not re.search(r"(?<!\\)[<>\[\]]", r) for r in rows)  # are escaped text


def test_moe_heatmap_figure():
    rows = [dict(name=f"l{layer}.e{e}", layer=layer, module="down_proj", expert=e, status="ok",
                 alpha=2 + layer + e / 10, rand_num_spikes=e % 2, warning="")
            for layer in range(3) for e in range(4)]
    rows[0]["module"] = "$\\nope{$"  # not valid mathtext: must be drawn as text
    figs = make_figures(pd.DataFrame(rows))
    assert [f.key for f in figs] == ["alpha_by_layer", "traps_by_layer", "experts"]
    assert all(f.png.startswith(b"\x89PNG") for f in figs)


# -- a real headless browser ------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _visible_names(driver):
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#matrices tbody tr'))"
        ".filter(r => !r.hidden).map(r => r.cells[0].textContent);")


def _column(driver, col):
    return driver.execute_script(
        "const i = Array.from(document.querySelectorAll('#matrices thead th'))"
        ".findIndex(h => h.textContent === arguments[0]);"
        "return Array.from(document.querySelectorAll('#matrices tbody tr'))"
        ".filter(r => !r.hidden).map(r => r.cells[i].getAttribute('data-sort'));", col)


def test_report_in_headless_chromium(report, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get((report / "report.html").resolve().as_uri())
    assert browser.title.startswith("llm-audit: ")
    assert browser.execute_script("return document.readyState") == "complete"
    assert sorted(_visible_names(browser)) == sorted(HOSTILE)  # rendered as text, not markup
    imgs = browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    assert len(imgs) >= 3 and all(w > 100 for w in imgs)  # every figure decoded

    header = browser.find_element(By.XPATH, "//table[@id='matrices']//th[text()='alpha']")
    header.click()
    asc = [float(x) for x in _column(browser, "alpha")]
    assert asc == sorted(asc) and "asc" in header.get_attribute("class")
    header.click()
    desc = [float(x) for x in _column(browser, "alpha")]
    assert desc == sorted(asc, reverse=True)
    browser.find_element(By.XPATH, "//table[@id='matrices']//th[text()='name']").click()
    assert _visible_names(browser) == sorted(HOSTILE, key=str.lower)

    box = browser.find_element(By.ID, "filter")
    box.send_keys("<script>")
    time.sleep(0.1)
    assert _visible_names(browser) == [HOSTILE[0]]
    assert browser.find_element(By.ID, "shown").text == "1"
    box.clear()
    box.send_keys("x")  # an input event with an empty-ish query restores more rows
    box.clear()
    browser.execute_script("document.getElementById('filter')"
                           ".dispatchEvent(new Event('input'))")
    assert len(_visible_names(browser)) == len(HOSTILE)
    browser.find_element(By.ID, "flagged-only").click()
    flagged = _visible_names(browser)
    assert HOSTILE[0] in flagged and HOSTILE[2] in flagged  # the trap and the alpha < 2

    browser.save_screenshot(str(tmp_path / "report.png"))  # under tmp: stays out of git
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []


def test_diff_page_in_headless_chromium(report, browser, tmp_path):
    from selenium.webdriver.common.by import By

    assert main(["diff", str(report), str(report), "--out", str(tmp_path), "-q",
                 "--format", "html"]) == 0
    browser.get((tmp_path / "diff.html").resolve().as_uri())
    assert browser.title.startswith("llm-audit diff: ")
    assert sorted(_visible_names(browser)) == sorted(HOSTILE)
    browser.find_element(By.XPATH, "//table[@id='matrices']//th[text()='alpha_a']").click()
    asc = [float(x) for x in _column(browser, "alpha_a")]
    assert asc == sorted(asc)
    browser.find_element(By.ID, "filter").send_keys("plain")
    assert _visible_names(browser) == [HOSTILE[3]]
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []


def test_moe_report_end_to_end(tmp_path):
    from .checkpoints import write_gpt_oss

    model = write_gpt_oss(tmp_path / "gpt-oss-tiny", layers=1, experts=2)
    out = tmp_path / "out"
    assert main([str(model), "--out", str(out), "-q", "--format", "html,csv"]) == 0
    d = pd.read_csv(out / "layers.csv")
    suspicious = d[(d["rand_num_spikes"] > 0) | (d["alpha"] < 2) | (d["status"] != "ok")]
    html = (out / "report.html").read_text()
    assert 'id="fig-experts"' in html  # the layer x expert heatmap
    assert html.count('id="fig-spectra_') == min(12, len(suspicious)) > 0
    for name in suspicious["name"][:12]:  # expert matrices' spectra are found by their names
        assert f"<code>{name}</code>" in html


def test_markdown_layer_by_expert_tables():
    from llm_audit.report.markdown import expert_grid, render_markdown
    from llm_audit.summary import AuditSummary

    rows = [dict(name=f"l{layer}.e{e}.{m}", layer=layer, expert=e, module=m,
                 alpha=2.0 + layer + e + (0.5 if m == "up" else 0.0),
                 rand_num_spikes=layer * e, warning="", N=8, M=8)
            for layer in (0, 1) for e in (0, 1, 2) for m in ("gate", "up")]
    d = pd.DataFrame(rows)
    d["layer"], d["expert"] = d["layer"].astype("Int64"), d["expert"].astype("Int64")
    grid = expert_grid(d, "alpha", "mean")
    assert grid.shape == (2, 3) and grid.loc[1, 2] == pytest.approx(5.25)  # mean of gate/up
    assert expert_grid(d, "rand_num_spikes", "sum").loc[1, 2] == 4  # 2 modules x 1*2 traps
    summary = AuditSummary(model="m", matrices_analysed=12, matrices_failed=0,
                           tensors_skipped=0, mean_alpha=3.0, num_over_trained=0,
                           num_under_trained=0, total_traps=6, matrices_with_traps=4,
                           options={"trap_rule": "ww"}, elapsed_seconds=1.0)
    md = render_markdown(d, summary, pd.DataFrame(columns=["name", "dtype", "shape", "reason"]))
    assert "| layer | e0 | e1 | e2 |" in md
    assert "| 1 | 3.25 | 4.25 | 5.25 |" in md and "| 1 | 0 | 2 | 4 |" in md
