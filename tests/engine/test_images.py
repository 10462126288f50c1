import threading

import numpy as np
from PIL import Image

from sdstack.engine.images import pil_to_tensor, resize_image, tensor_to_pil


def striped(w, h):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(a)


def test_pixel_tensor_round_trip_is_exact():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(img))[0]), np.asarray(img))


def test_resize_modes():
    src = striped(200, 100)  # wide source into a square target
    just = resize_image(src, 0, 64, 64)
    assert just.size == (64, 64)
    crop = np.asarray(resize_image(src, 1, 64, 64))
    # crop and resize: scaled to height 64 (width 128), centre 64 columns kept: left half red, right half blue
    assert crop[32, 5].tolist() == [255, 0, 0] and crop[32, 58].tolist() == [0, 0, 255]
    fill = np.asarray(resize_image(src, 2, 64, 64))
    # resize and fill: scaled to width 64 (height 32) and centred; the bands above/below are filled by
    # stretching the edge rows, so the top row has the same colours as the image's first row
    assert fill[0, 5].tolist() == [255, 0, 0] and fill[63, 58].tolist() == [0, 0, 255]


def test_interrupt_from_another_thread_returns_partial(tiny_sd1):
    from sdstack.engine.generate import Control, generate
    from sdstack.params import make_params

    control, started = Control(), threading.Event()
    result = {}

    def worker():
        result["r"] = generate(tiny_sd1, make_params(prompt="x", steps=400, seed=1), control=control,
                               on_step=lambda p: started.set())

    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(60)
    control.interrupt.set()
    t.join(60)
    assert not t.is_alive()
    assert result["r"].interrupted and len(result["r"].images) == 1
