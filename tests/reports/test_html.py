"""The HTML report: self-contained, escaped, and it renders in a real browser."""

import base64
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fidelity.core.errors import FidelityError
from fidelity.reports import write_reports
from fidelity.results import RunResults
from fidelity.runner import RunOptions, run_suite
from fidelity.suite import parse_suite

MARKUP_SUITE = {
    # A suite's name is a path component (letters, digits, . _ + -); its description is free.
    "name": "markup",
    "description": "<script>alert('suite')</script>",
    "problems": ["tests.fidelity.user_problems:markup_text_problem"],
    "selection": {"test_points": 4, "top": 6, "random": 6},
    "metrics": {"bootstrap": 50},
    "estimators": [{"kind": "exact", "label": "ex<b>act</b>"}, {"kind": "grad-dot"}],
    "responses": [{"kind": "cold"}, {"kind": "linear"}],
}


@pytest.fixture(scope="module")
def markup_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "run"
    run_suite(parse_suite(MARKUP_SUITE), RunOptions(out=out))
    return out


def test_markup_from_training_texts_and_configuration_is_escaped(markup_run):
    page = (markup_run / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "onerror=" not in page.lower().replace("onerror=&quot;", "")
    assert not re.search(r"<[^>]*\sonerror\s*=", page, flags=re.IGNORECASE)
    assert "<b>act</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the training text is shown
    assert "onerror=&quot;alert(2)&quot;" in page
    assert "ex&lt;b&gt;act&lt;/b&gt;" in page
    markdown = (markup_run / "report.md").read_text(encoding="utf-8")
    assert "<script" not in markdown and "<img src=x" not in markdown
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown


def test_the_report_is_one_file_with_every_figure_embedded(markup_run):
    page = (markup_run / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4  # scatter grid, correlations, per-test, decomposition (linear)
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(href|src)="(https?:)?//', page)
    # The first screen: the verdict matrix right after the title.
    first_table = page.index("<table")
    assert page.index("against each response") < first_table < page.index("<h2")
    for heading in (
        "Fidelity",
        "Per-test-point correlations",
        "Most influential removals",
        "Estimator diagnostics",
        "Timings",
        "Configuration and environment",
    ):
        assert f"<h3>{heading}</h3>" in page or f">{heading}</h2>" in page


def test_tables_hold_the_run_s_numbers(markup_run):
    results = json.loads((markup_run / "results.json").read_text())
    (problem,) = results["problems"].values()
    page = (markup_run / "report.html").read_text(encoding="utf-8")
    pearson = problem["metrics"]["ex<b>act</b>"]["cold"]["pearson"]
    assert f"{pearson['value']:.4f} [{pearson['low']:.4f}, {pearson['high']:.4f}]" in page
    arrays = np.load(markup_run / problem["arrays_file"])
    actual = arrays["response/cold"]
    strongest = int(arrays["removed_index"][np.abs(actual).mean(0).argmax()])
    assert problem["most_influential"][0]["train_index"] == strongest
    assert problem["most_influential"][0]["mean_actual"] == pytest.approx(
        actual[:, np.abs(actual).mean(0).argmax()].mean()
    )
    for label in ("fit_peak_memory_bytes", "scores_peak_memory_bytes"):
        assert problem["estimators"]["grad-dot"][label] >= 0


def test_rerendering_reproduces_the_reports(markup_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(markup_run, copy)
    for name in ("report.md", "report.html"):
        (copy / name).unlink()
    for figure in (copy / "figures").glob("*.png"):
        figure.unlink()
    write_reports(copy, RunResults.load(copy))
    assert (copy / "report.md").read_text() == (markup_run / "report.md").read_text()
    drawn = sorted((markup_run / "figures").glob("*.png"))
    assert len(drawn) == 4
    for figure in drawn:  # the same results draw the same figures, byte for byte
        assert (copy / "figures" / figure.name).read_bytes() == figure.read_bytes(), figure.name
    assert (copy / "report.html").stat().st_size > 10_000


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _browser_session():
    found = _chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,2000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=found[1]), options=options)


def _console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.mark.browser
def test_the_report_renders_in_headless_chromium_without_console_errors(markup_run, tmp_path):
    driver = _browser_session()
    try:
        broken = tmp_path / "broken.html"
        broken.write_text(
            '<html><body><script>console.error("boom")</script>'
            '<img src="missing.png"></body></html>'
        )
        driver.get(broken.as_uri())
        assert _console_errors(driver), "the console check must see a deliberate error"

        driver.get((markup_run / "report.html").resolve().as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        assert _console_errors(driver) == []
        assert driver.title.startswith("fidelity report:")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])"
        )
        assert len(images) == 4 and all(done and width > 100 for done, width in images)
        assert driver.execute_script("return document.scripts.length") == 0
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] > 500 and pixels.std() > 0.05  # not a blank page
    keep = os.environ.get("FIDELITY_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")


def test_conformance_table_flags_disagreement_nan_and_crashes_without_ending_the_run(tmp_path):
    suite = parse_suite(
        {
            "name": "conformance",
            "problems": ["tests.fidelity.user_problems:tiny"],
            "selection": {"test_points": 3, "top": 4, "random": 4},
            "metrics": {"bootstrap": 20},
            "estimators": [
                {"kind": "exact"},
                {"kind": "cg", "tol": 1e-12, "reference": "exact", "tolerance": 1e-6},
                {"kind": "grad-dot", "reference": "exact"},
                {
                    "kind": "tests.fidelity.user_estimators:NanAfterFirstColumn",
                    "label": "broken",
                    "reference": "exact",
                },
                {
                    "kind": "grad-cos",
                    "reference": "exact",
                    "requires": ["fidelity_no_such_library"],
                },
                {
                    "kind": "tests.fidelity.user_estimators:CrashesInFit",
                    "label": "crash-fit",
                    "reference": "exact",
                },
                {
                    "kind": "tests.fidelity.user_estimators:CrashesInScores",
                    "label": "crash-scores",
                    "reference": "grad-dot",
                    "tolerance": 1e-6,
                },
            ],
            "responses": [{"kind": "cold"}],
        }
    )
    out = tmp_path / "run"
    results = run_suite(suite, RunOptions(out=out))
    (problem,) = results.problems.values()
    found = problem.conformance
    assert set(found) == {"cg", "grad-dot", "broken", "crash-fit", "crash-scores"}
    assert found["crash-fit"].flagged and found["crash-fit"].pearson is None
    assert found["crash-fit"].reason == (
        "crashed: fit raised UnboundLocalError: cannot access local variable 'a_prev'"
    )
    assert found["crash-scores"].reason == "crashed: scores raised RuntimeError: shape mismatch"
    assert found["crash-scores"].tolerance == 1e-6
    assert not {"crash-fit", "crash-scores"} & set(problem.estimators)
    assert problem.skipped_estimators == {
        "grad-cos": "not importable here: fidelity_no_such_library"
    }
    assert "grad-cos" not in problem.estimators
    arrays = np.load(out / problem.arrays_file)
    exact, cg = arrays["estimator/exact"], arrays["estimator/cg"]
    assert found["cg"].max_relative_difference == pytest.approx(
        np.abs(cg - exact).max() / np.abs(exact).max()
    )
    assert not found["cg"].flagged and found["cg"].pearson > 0.999999
    assert found["cg"].tolerance == 1e-6 and found["grad-dot"].tolerance is None
    assert found["grad-dot"].flagged and found["grad-dot"].reason.startswith("Pearson")
    assert found["broken"].flagged and found["broken"].finite is False
    assert found["broken"].reason == f"{3 * 7} NaN or infinite value(s)"
    assert problem.metrics["broken"]["cold"]["pearson"].value is None
    markdown = (out / "report.md").read_text()
    assert "PROBABLE DEFECT: 21 NaN or infinite value(s)" in markdown
    assert "| cg | cg | exact | 1.000000 |" in markdown and "| 1e-06 |" in markdown
    assert "broken: probable implementation defect against exact" in markdown
    assert "| crash-fit | - | exact | n/a | n/a | - | no | PROBABLE DEFECT: crashed: fit" in (
        markdown.replace("\\", "")
    )
    unescaped = markdown.replace("\\", "")
    assert "grad-cos: skipped (not importable here: fidelity_no_such_library)" in unescaped
    assert "PROBABLE DEFECT" in (out / "report.html").read_text()


def test_an_adapter_that_refuses_the_problem_ends_the_run_with_its_message(tmp_path):
    suite = parse_suite(
        {
            "name": "refusal",
            "problems": ["tests.fidelity.user_problems:tiny"],
            "selection": {"test_points": 3, "top": 4, "random": 4},
            "metrics": {"bootstrap": 20},
            "estimators": [
                {"kind": "exact"},
                {
                    "kind": "tests.fidelity.user_estimators:RefusesTheProblem",
                    "label": "refuses",
                    "reference": "exact",
                },
            ],
            "responses": [{"kind": "cold"}],
        }
    )
    with pytest.raises(FidelityError, match="supports cross-entropy only"):
        run_suite(suite, RunOptions(out=tmp_path / "run"))
