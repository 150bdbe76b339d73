"""The sample browser in a real browser: the demo's bundle opened by file:// in headless Chromium (Debian's chromium and
chromium-driver; .ci/run installs them). What it must show is computed here from the results files, independently."""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from lmms_vg import browse, cli

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
MISSING = "Chromium and chromedriver not installed (apt-get install chromium chromium-driver; .ci/run does)"
if os.environ.get("LMMS_VG_REQUIRE_BROWSER") and not (CHROMIUM and DRIVER):  # CI: a browser test may not skip
    raise RuntimeError(MISSING)
needs_chromium = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason=MISSING)
ARTIFACTS = Path(os.environ.get("LMMS_VG_ARTIFACTS", "test-artifacts"))


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    found = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield found
    found.quit()


def samples(results: Path) -> dict[tuple[str, str], dict[tuple[str, int], dict]]:
    """(model folder, task) -> {(task, doc id): the logged line}, read from the sample logs as lmms-eval wrote them."""
    found = {}
    for path in results.rglob("*_samples_*.jsonl"):
        task = path.name.split("_samples_", 1)[1].removesuffix(".jsonl")
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        found[(path.parent.name, task)] = {(task, line["doc_id"]): line for line in lines}
    return found


def open_browser(driver, index: Path, hash_: str = "") -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(index.as_uri() + hash_)
    WebDriverWait(driver, 20).until(lambda d: d.find_element("id", "count").text)


def count(driver) -> int:
    return int(driver.find_element("id", "count").text.split()[0])


def choose(driver, select_id: str, text: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", select_id)).select_by_visible_text(text)


@needs_chromium
def test_the_demo_browser_opens_from_disk_and_shows_every_item(demo, driver):
    out, _ = demo
    index = out / "report" / "browser" / "index.html"
    assert "fetch(" not in index.read_text()  # a page on file:// may not fetch
    open_browser(driver, index)
    items = {key for lines in samples(out / "results").values() for key in lines}
    assert count(driver) == len(items)
    from selenium.webdriver.support.ui import WebDriverWait

    def cards():
        return len(driver.find_elements("css selector", ".card"))

    while cards() < len(items):  # cards render a page at a time as the list scrolls
        seen = cards()
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        WebDriverWait(driver, 10).until(lambda d, seen=seen: cards() > seen)
    assert cards() == len(items)
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "browser_all.png"))


@needs_chromium
def test_filters_give_the_counts_the_results_files_give(demo, driver):
    out, _ = demo
    logs = samples(out / "results")
    base, refined = logs[("lmms_vg_demo", "medvqa_demo_shifted")], logs[("lmms_vg_demo_vgrefine", "medvqa_demo_shifted")]
    right = {key: line["accuracy"]["correct"] for key, line in base.items()}
    fixed = {key: line["accuracy"]["correct"] for key, line in refined.items()}
    gained = sum(1 for k in right if not right[k] and fixed[k])
    lost = sum(1 for k in right if right[k] and not fixed[k])
    every_run = [lines for (model, task), lines in logs.items() if task == "medvqa_demo_shifted"]
    all_wrong = sum(1 for k in right if all(not lines[k]["accuracy"]["correct"] for lines in every_run))
    colour = sum(1 for k, line in base.items() if line["accuracy"]["category"] == "attribute")
    asked = sum(1 for k, line in base.items() if "shape" in line["input"].lower())
    open_browser(driver, out / "report" / "browser" / "index.html")
    choose(driver, "task", "medvqa_demo_shifted")
    assert count(driver) == len(base)
    choose(driver, "run-a", "lmms_vg_demo")
    choose(driver, "run-b", "lmms_vg_demo + VGRefine")
    for outcome, expected in (("A wrong, B right", gained), ("A right, B wrong", lost), ("every run wrong", all_wrong)):
        choose(driver, "outcome", outcome)
        assert count(driver) == expected, outcome
        if outcome == "A wrong, B right":  # README's screenshot: the items VGRefine gained on the shifted domain, the first open
            driver.find_element("css selector", ".card").click()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / "browser_gained.png"))
    choose(driver, "outcome", "all")
    choose(driver, "category", "attribute")
    assert count(driver) == colour
    choose(driver, "category", "every category")
    driver.find_element("id", "search").send_keys("shape")
    assert count(driver) == asked
    assert gained > 0 and lost >= 0  # the demo's shifted domain: VGRefine gains items


@needs_chromium
def test_the_layer_slider_changes_the_heatmap_and_a_permalink_opens_its_card(demo, driver):
    out, _ = demo
    open_browser(driver, out / "report" / "browser" / "index.html", "#vgmed_demo_shifted/7")
    active = driver.execute_script("return document.activeElement.id")
    assert active == "card-vgmed_demo_shifted/7"
    card = driver.find_element("id", active)
    canvas = card.find_element("css selector", "canvas")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
    before = canvas.screenshot_as_png
    slider = card.find_element("css selector", "input.layer-slider")
    start = int(slider.get_attribute("value"))
    card.send_keys("\ue012" if start > 0 else "\ue014")  # the left or right arrow: the focused card's layer
    assert int(slider.get_attribute("value")) != start
    after = canvas.screenshot_as_png
    assert before != after
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "browser_card.png").write_bytes(card.screenshot_as_png)


@needs_chromium
def test_keyboard_moves_the_focus_from_card_to_card(demo, driver):
    out, _ = demo
    open_browser(driver, out / "report" / "browser" / "index.html")
    first, second = driver.find_elements("css selector", ".card")[:2]
    first.click()
    driver.switch_to.active_element.send_keys("j")
    assert driver.switch_to.active_element.get_attribute("id") == second.get_attribute("id")
    driver.switch_to.active_element.send_keys("k")
    assert driver.switch_to.active_element.get_attribute("id") == first.get_attribute("id")


def test_folders_without_sample_logs_are_named_and_missing_images_get_a_card(demo, tmp_path, capsys):
    out, _ = demo
    bare = tmp_path / "bare"
    shutil.copytree(out / "results" / "lmms_vg_demo_pai", bare)
    for log in bare.rglob("*_samples_*.jsonl"):
        log.unlink()
    assert cli.main(["browse", str(bare), "--out", str(tmp_path / "b1")]) == 2
    assert "--log_samples" in capsys.readouterr().err
    moved = tmp_path / "moved"  # the PAI run's images gone: its cards say so
    shutil.copytree(out / "results" / "lmms_vg_demo_pai", moved)
    for log in moved.rglob("*_samples_*.jsonl"):
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        log.write_text("".join(json.dumps({**x, "input_media": ["/nowhere/" + Path(x["input_media"][0]).name]}) + "\n" for x in lines))
    browse.browse([moved], tmp_path / "b2")
    data = (tmp_path / "b2" / "data.js").read_text()
    items = json.loads(data.removeprefix("window.LMMS_VG_DATA = ").rstrip().rstrip(";"))["items"]
    assert len(items) == 384 and all(i[4] is None and i[5].startswith("image missing: /nowhere/") for i in items)


def test_runs_on_different_item_sets_are_shown_apart(demo, tmp_path):
    out, _ = demo
    other = tmp_path / "other"
    shutil.copytree(out / "results" / "lmms_vg_demo_pai", other)
    path = next(other.rglob("*_results.json"))
    data = json.loads(path.read_text())
    for task in data["results"]:
        data["results"][task]["samples,none"]["item_set"] = "another set"
    path.write_text(json.dumps(data))
    browse.browse([out / "results" / "lmms_vg_demo", other], tmp_path / "b")
    tasks = json.loads((tmp_path / "b" / "data.js").read_text().removeprefix("window.LMMS_VG_DATA = ").rstrip().rstrip(";"))["tasks"]
    assert "medvqa_demo [another set]" in tasks and "medvqa_demo [lmms-vg demo]" in tasks
    assert Counter(t.split(" [")[0] for t in tasks)["medvqa_demo"] == 2
