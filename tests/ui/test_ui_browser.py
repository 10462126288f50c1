"""End to end in headless Chromium: the page behind --api-auth, txt2img with live progress, the gallery, PNG
info, send to txt2img / img2img, img2img, the seed buttons, and Interrupt. Screenshots go to tests/artifacts/."""

import re
import time

import httpx

PROMPT = "a red star on a blue background"


def _set_number(page, elem_id: str, value) -> None:
    """Type into a Gradio slider's / number box's input and commit it (blur)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def _number(page, elem_id: str) -> float:
    return float(page.locator(f"#{elem_id} input[type=number]").input_value())


def _open(page, url: str) -> None:
    page.goto(url + "/", wait_until="domcontentloaded")
    page.locator("#txt2img_generate").wait_for(state="visible")


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def _jobs(ui_server) -> list[dict]:
    return httpx.get(ui_server.url + "/api/v1/jobs", auth=ui_server.auth, timeout=30).json()


def _generate_small(page, prompt: str, seed: int, steps: int = 2) -> None:
    page.locator("#txt2img_prompt textarea").fill(prompt)
    for elem_id, value in (("txt2img_steps", steps), ("txt2img_width", 64), ("txt2img_height", 64),
                           ("txt2img_seed", seed)):
        _set_number(page, elem_id, value)
    page.locator("#txt2img_generate").click()


def test_txt2img_to_gallery(page, ui_server, artifacts):
    _open(page, ui_server.url)
    before = len(_jobs(ui_server))
    _generate_small(page, PROMPT, seed=1234)
    page.locator("#txt2img_progress [data-status=done]").wait_for(timeout=120_000)
    page.locator("#txt2img_results img").first.wait_for(state="visible")
    info = page.locator("#txt2img_info textarea").input_value()
    assert PROMPT in info and "Steps: 2" in info and "Size: 64x64" in info and "Seed: 1234" in info
    page.screenshot(path=str(artifacts / "ui_txt2img.png"), full_page=True)

    jobs = _jobs(ui_server)   # the UI's generation is a job row in the durable queue, like an API call
    assert len(jobs) == before + 1
    job = jobs[0]
    assert (job["source"], job["status"], job["params"]["steps"], job["params"]["seed"]) == ("ui", "done", 2, 1234)

    _tab(page, "Gallery")
    page.locator("#gallery img").first.wait_for(state="visible")
    page.locator("#gallery_search textarea, #gallery_search input").first.fill("nothing-like-this")
    page.locator("#gallery_search_button").click()
    page.locator("#gallery img").first.wait_for(state="detached")
    page.locator("#gallery_search textarea, #gallery_search input").first.fill("red star")
    page.locator("#gallery_search_button").click()
    page.locator("#gallery img").first.wait_for(state="visible")
    page.screenshot(path=str(artifacts / "ui_gallery.png"), full_page=True)

    page.locator("#gallery img").first.click()
    page.wait_for_function("document.querySelector('#gallery_info textarea').value.includes('Seed: 1234')")
    _tab(page, "txt2img")
    page.locator("#txt2img_prompt textarea").fill("")    # the send button must put it back
    _tab(page, "Gallery")
    page.locator("#gallery_to_txt2img").click()
    page.wait_for_function(f"document.querySelector('#txt2img_prompt textarea').value === {PROMPT!r}")
    assert _number(page, "txt2img_seed") == 1234
    assert not page.outside_requests, f"the page fetched from outside the server: {page.outside_requests[:5]}"


def test_png_info_and_seed_buttons(page, ui_server, artifacts):
    _open(page, ui_server.url)
    _generate_small(page, "a green circle", seed=777)
    page.locator("#txt2img_progress [data-status=done]").wait_for(timeout=120_000)
    job = _jobs(ui_server)[0]
    path = ui_server.data_dir / "outputs" / job["images"][0]["path"]

    _set_number(page, "txt2img_seed", 5)
    page.locator("#txt2img_seed_random").click()
    page.wait_for_function("document.querySelector('#txt2img_seed input[type=number]').value === '-1'")
    page.locator("#txt2img_seed_reuse").click()
    page.wait_for_function("document.querySelector('#txt2img_seed input[type=number]').value === '777'")

    _tab(page, "PNG Info")
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(path))
    page.wait_for_function("document.querySelector('#pnginfo_text textarea').value.includes('Seed: 777')")
    assert "a green circle" in page.locator("#pnginfo_text textarea").input_value()
    page.screenshot(path=str(artifacts / "ui_pnginfo.png"), full_page=True)
    _tab(page, "txt2img")
    page.locator("#txt2img_prompt textarea").fill("")
    _set_number(page, "txt2img_steps", 20)
    _tab(page, "PNG Info")
    page.locator("#pnginfo_to_txt2img").click()
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value === 'a green circle'")
    assert _number(page, "txt2img_steps") == 2
    assert _number(page, "txt2img_seed") == 777

    _tab(page, "PNG Info")                   # the same image and parameters into img2img, and generate there
    page.locator("#pnginfo_to_img2img").click()
    page.locator("#img2img_init img").wait_for(state="visible")
    assert page.locator("#img2img_prompt textarea").input_value() == "a green circle"
    assert _number(page, "img2img_steps") == 2
    _set_number(page, "img2img_denoising_strength", 0.5)
    page.locator("#img2img_generate").click()
    page.locator("#img2img_progress [data-status=done]").wait_for(timeout=120_000)
    page.locator("#img2img_results img").first.wait_for(state="visible")
    page.screenshot(path=str(artifacts / "ui_img2img.png"), full_page=True)
    job = _jobs(ui_server)[0]
    assert (job["source"], job["kind"], job["status"]) == ("ui", "img2img", "done")
    assert job["params"]["denoising_strength"] == 0.5 and job["params"]["seed"] == 777


def test_progress_preview_and_interrupt(page, ui_server):
    _open(page, ui_server.url)
    _generate_small(page, "a long one", seed=1, steps=400)
    page.locator("#txt2img_progress [data-status=running]").wait_for(timeout=120_000)
    page.wait_for_function("/Step [1-9]\\d*\\/400/.test(document.querySelector('#txt2img_progress').innerText)")
    page.locator("#txt2img_preview img").wait_for(state="visible")
    page.locator("#txt2img_interrupt").click()
    page.locator("#txt2img_progress [data-status=done]").wait_for(timeout=120_000)
    assert "(interrupted)" in page.locator("#txt2img_progress").inner_text()
    job = _jobs(ui_server)[0]
    assert job["status"] == "done" and job["result"]["interrupted"] is True
    step = re.search(r"Steps: (\d+)", job["result"]["infotexts"][0])
    assert step and step.group(1) == "400"
