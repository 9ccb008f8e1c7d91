"""The documentation site builds with `mkdocs build --strict` (a broken link, a missing page or a docstring that does
not render fails), and its pages render in headless Chromium with the navigation and no error."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers_browser import chromium, free_port, wait_for_server

REPO_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS_ENV = "EMOVLM_KD_DOCS_SCREENSHOTS"  # keep the screenshots in this folder (to look at them)

pytestmark = pytest.mark.slow  # a site build in a subprocess (~15 s), a browser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return site_dir, result


def test_the_site_builds_strict_without_a_warning(site):
    site_dir, result = site
    assert result.returncode == 0, result.stderr[-4000:]
    assert not re.search(r"^WARNING", result.stderr, flags=re.MULTILINE), result.stderr[-4000:]
    pages = ["index.html", "getting-started/index.html", "training/index.html", "using/index.html"]
    pages += ["reference/config/index.html", "reference/stage-arguments/index.html", "benchmarks/index.html"]
    for page in pages:
        assert (site_dir / page).is_file(), page
    # the reference pages hold the rendered docstrings and the live settings tables
    config = (site_dir / "reference" / "config" / "index.html").read_text()
    assert "EmoVLMKDConfig" in config and "vlm_branch_mode" in config
    arguments = (site_dir / "reference" / "stage-arguments" / "index.html").read_text()
    assert "--gate_type" in arguments and "--load_in_4bit" in arguments and "--run_dir" in arguments
    # the included repository files are on the site, their links working
    assert "Where the time goes" in (site_dir / "benchmarks" / "index.html").read_text()
    assert "Data flow" in (site_dir / "architecture" / "index.html").read_text()


def serve(site_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    wait_for_server(url, server, timeout=30)
    return server, url


def test_the_home_page_and_the_training_guide_render_in_headless_chromium(site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    site_dir, result = site
    assert result.returncode == 0, result.stderr[-4000:]
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    server, url = serve(site_dir)
    driver = None
    seen = {}
    try:
        driver = chromium(tempfile.mkdtemp(dir=tmp_path, prefix="chromium-profile-"))
        driver.set_page_load_timeout(30)
        wait = WebDriverWait(driver, 30)
        for name, path, title in (("home", "", "emovlm-kd"), ("training", "training/", "Training on your data")):
            driver.get(url + path)
            wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
            heading = driver.find_element(By.CSS_SELECTOR, "article h1").text.replace("¶", "").strip()
            navigation = [link.get_attribute("textContent").strip() for link in driver.find_elements(
                By.CSS_SELECTOR, "nav.md-nav--primary .md-nav__link")]
            images = driver.execute_script(
                "return Array.from(document.querySelectorAll('article img')).map(i => [i.src, i.naturalWidth])"
            )
            errors = [
                entry["message"]
                for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and "favicon" not in entry["message"]
            ]
            driver.save_screenshot(str(shots / f"docs-{name}.png"))
            seen[name] = dict(title=title, heading=heading, navigation=navigation, images=images, errors=errors)
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=10)

    from PIL import Image

    for name, page in seen.items():
        assert page["heading"] == page["title"], page
        assert not page["errors"], page["errors"]  # no failed request (missing asset) or script error
        for entry in ("Getting started", "Training guide", "Using a model", "Reference", "Benchmarks", "Changelog"):
            assert entry in page["navigation"], (name, page["navigation"])
        assert all(width > 0 for _, width in page["images"]), page["images"]  # every image loaded
        with Image.open(shots / f"docs-{name}.png") as screenshot:
            assert screenshot.size[0] >= 1000
            colours = screenshot.convert("RGB").resize((64, 64)).getcolors(64 * 64)
            assert colours is not None and len(colours) > 20  # a rendered page, not a blank one
    assert any(src.endswith("method.png") for src, _ in seen["home"]["images"])  # the method figure is shown
