"""The page GET / serves, in a real headless browser (Debian's chromium, driven by Selenium) against a real
Serve app over loopback: load it, upload an image, ask, see the streamed answer rendered; caption, match,
and an error shown as the API gives it.

The app's retrieval model is a directory as transformers saves ``Blip2ForImageTextRetrieval`` (Salesforce's
published layout: no side file of ours, a tokenizer without [DEC]), so /v1/match and /v1/embed are tested
on it here, with and without the browser.

The browser comes from `make browser` (part of `make test`, as root); without chromium and chromedriver
the browser test is skipped and says so. BLIP2_PAGE_SCREENSHOT=<file.png> saves a screenshot of the page
mid-conversation (the README's is made that way)."""

import os
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from blip2.config import load_config
from blip2.toyworld.world import all_attributes, render
from pipelines.common import CONFIG_DIR
from pipelines.serve import ServeConfig, application
from tests.blip2.test_serving_runtime import write_salesforce_layout_retrieval
from tests.pipelines.test_serve import b64, data_url, png
from tests.ports import free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

APP = "blip2-page"
OVERRIDES = ["replica.num_cpus=0.5", "autoscaling.max_replicas=1", "http.ingress_num_cpus=0.1",
             "limits.default_max_new_tokens=8", "replica.health_check_period_s=30"]


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    retrieval = tmp_path_factory.mktemp("published") / "itm"
    write_salesforce_layout_retrieval(retrieval)
    port = free_port()
    config = load_config(ServeConfig, CONFIG_DIR / "serve_toy.yaml",
                         [*OVERRIDES, f"model.retrieval={retrieval}", f"http.port={port}"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(config), name=APP, route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, config
    serve.shutdown()


def test_the_page_is_served_self_contained(server):
    client, _ = server
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    page = response.text
    assert "v1/chat/completions" in page and "<script src" not in page and "<link" not in page
    assert "http://" not in page and "https://" not in page  # nothing from another host


def test_a_retrieval_directory_in_salesforce_layout_serves_match_and_embed(server):
    client, _ = server
    match = client.post("/v1/match", json={"image": b64(png()), "text": "a large red circle"})
    assert match.status_code == 200, match.text
    assert 0 <= match.json()["itm_probability"] <= 1 and -1 <= match.json()["itc_similarity"] <= 1
    embed = client.post("/v1/embed", json={"image": b64(png()), "text": "a red circle"}).json()
    assert len(embed["image_embedding"]) == 8 and len(embed["text_embedding"]) == len(embed["image_embedding"][0])


@pytest.fixture
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("chromium and chromedriver are not installed: run `make browser` as root "
                    "(apt-get install chromium chromium-driver) to run the page's browser test")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # Debian's; never Selenium Manager's download
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=980,720", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


def toy_image(path):
    image = Image.fromarray(render(all_attributes()[0], np.random.default_rng(0)))
    image.save(path)
    return path


def test_a_person_uploads_an_image_asks_and_sees_the_answer_stream_in(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    client, config = server
    wait = WebDriverWait(browser, 60)
    browser.get(str(client.base_url) + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == config.model.id)
    path = toy_image(tmp_path / "shape.png")
    browser.find_element(By.ID, "file").send_keys(str(path))  # what choosing a file in the dialog does
    wait.until(ec.element_to_be_clickable((By.ID, "ask")))

    question = "describe the image."
    browser.find_element(By.ID, "question").send_keys(question + "\n")
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".turn.assistant.done"))
    # The same conversation through the API, not streamed (greedy): the page rendered exactly that.
    image = browser.execute_script("return image")
    expected = client.post("/v1/chat/completions", json={"model": config.model.id, "messages": [
        {"role": "user", "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image}}]}],
    }).json()["choices"][0]["message"]["content"]
    assert answer.text.strip() == expected.strip() and expected.strip()
    assert len(expected.split()) >= 2 and int(answer.get_attribute("data-chunks")) >= 2  # it arrived in pieces
    assert image.startswith("data:image/png") and image == data_url(path.read_bytes())

    browser.find_element(By.ID, "question").send_keys("what colour is the shape?\n")  # a second turn
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant.done")) == 2)
    browser.find_element(By.ID, "caption").click()
    wait.until(lambda d: d.find_element(By.ID, "caption-result").text.startswith("caption:"))
    browser.find_element(By.ID, "match-text").send_keys("a large red circle on the left")
    browser.find_element(By.ID, "match").click()
    wait.until(lambda d: "ITM P(match)" in d.find_element(By.ID, "match-result").text)
    if os.environ.get("BLIP2_PAGE_SCREENSHOT"):
        browser.save_screenshot(os.environ["BLIP2_PAGE_SCREENSHOT"])

    # Only the server the page came from was contacted.
    origin = browser.execute_script("return location.origin")
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(name.startswith(origin) for name in resources), resources

    browser.find_element(By.ID, "match-text").clear()  # an empty text: the API's 400, shown as it came
    browser.find_element(By.ID, "match").click()
    error = wait.until(lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").text else None)
    assert error.text == "400 text_empty: the text is empty"
