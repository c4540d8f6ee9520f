"""msf app: the page is driven through Gradio's HTTP API, as a browser or a script would."""

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image

from msf.config import SamplerSettings
from msf.interfaces.app import build_app, stage_titles
from msf.interfaces.scale_view import view_scales
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.data import to_uint8


def test_app_serves_each_scale_of_the_libraries_samples(tmp_path):
    pipe = MSFPipeline(preset("tiny").model)
    for p in pipe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    names = pipe.config.class_names or [f"class {c}" for c in range(pipe.config.num_classes)]
    app = build_app(pipe)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True)
    try:
        client = Client(app.local_url, verbose=False)
        # class, seed, samples; per scale: steps, guidance, solver, shift, guided from t, to t
        *files, timing = client.predict(names[2], 7, 3, 2, 3, 2.0, 1.0, "heun", "euler", 2.0, 1.0,
                                        0.0, 0.0, 0.6, 1.0, api_name="/generate")
        paper = SamplerSettings.named(pipe.config, "paper")
        filled = client.predict("paper", api_name="/fill")
    finally:
        app.close()
    assert len(files) == len(stage_titles(2)) == 4
    assert "scale 0:" in timing and "scale 1:" in timing
    assert "2 steps heun, cfg 2, shift 2, guided at t in [0, 0.6]" in timing
    assert list(filled) == [*paper.steps, *paper.cfg_scale, *paper.solver, *paper.shift, 0, 0, 1, 1]
    settings = SamplerSettings.of(pipe.config, [2, 3], [2.0, 1.0], ["heun", "euler"], shift=[2.0, 1.0],
                                  guidance_interval=[(0.0, 0.6), (0.0, 1.0)])
    view = view_scales(pipe, [2, 2, 2], seed=7, settings=settings, precision="auto")  # as the app
    expected = to_uint8(view.images).numpy()
    final = np.asarray(Image.open(files[-1]).convert("RGB"))
    assert final.shape == (4 * (3 * 18 - 2), 4 * 16, 3)  # three 16 px samples, 2 px gaps, 4x upscaled
    for i in range(3):
        np.testing.assert_array_equal(final[4 * 18 * i: 4 * (18 * i + 16): 4, ::4], expected[i])
    base = np.asarray(Image.open(files[0]).convert("RGB"))[:4 * 16:4, ::4]
    np.testing.assert_array_equal(base, to_uint8(torch.nn.functional.interpolate(
        view.base, size=(16, 16), mode="nearest")).numpy()[0])


def test_app_without_gradio_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gradio(name, *a, **k):
        if name == "gradio":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    from msf.config import ConfigError

    with pytest.raises(ConfigError, match="pip install gradio"):
        build_app(MSFPipeline(preset("tiny").model))


def test_serve_says_where_without_gradios_share_hint(tmp_path, capsys):
    from msf.interfaces.app import serve

    model = MSFPipeline(preset("tiny").model).save_pretrained(tmp_path / "m")
    app = serve(str(model), device="cpu", block=False)
    try:
        out = capsys.readouterr().out
    finally:
        app.close()
    assert f"msf app: serving {model} at {app.local_url}" in out
    assert f"msf app: loaded the EMA weights of {model.resolve()}" in out
    assert "share=True" not in out and "public link" not in out
