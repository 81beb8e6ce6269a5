// The live sampler's page: controls, the worker that samples (worker.js), and the pictures.
// window.ddpmSampler.run(options) is what the buttons call, and what the browser tests call with
// their own x_T to compare the result with ddpm_lib's sampler.
(() => {
  const GRID = 4; // 16 digits, 4 x 4
  const SCALE = 3; // screen pixels per image pixel
  const models = {}; // name -> {worker, meta}
  let frames = []; // the last run's steps, for the t slider

  const $ = (id) => document.getElementById(id);

  async function load(name) {
    if (models[name]) return models[name];
    const meta = await (await fetch(`models/${name}.json`)).json();
    const bytes = await (await fetch(`models/${name}.onnx`)).arrayBuffer();
    const worker = new Worker("sampler/worker.js");
    await new Promise((resolve, reject) => {
      worker.onmessage = (e) => (e.data.type === "ready" ? resolve() : reject(new Error(e.data.message)));
      worker.postMessage({ type: "load", model: new Uint8Array(bytes), meta }, []);
    });
    models[name] = { worker, meta };
    return models[name];
  }

  // x_T from a seed: mulberry32 and Box-Muller (not PyTorch's generator: the same seed gives the same
  // digits here, other digits than in Python).
  function gaussian(seed, n) {
    let a = seed >>> 0;
    const uniform = () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let r = Math.imul(a ^ (a >>> 15), 1 | a);
      r = (r + Math.imul(r ^ (r >>> 7), 61 | r)) ^ r;
      return ((r ^ (r >>> 14)) >>> 0) / 4294967296;
    };
    const out = new Float32Array(n);
    for (let i = 0; i < n; i += 2) {
      const u = Math.max(uniform(), 1e-12);
      const v = uniform();
      const r = Math.sqrt(-2 * Math.log(u));
      out[i] = r * Math.cos(2 * Math.PI * v);
      if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * v);
    }
    return out;
  }

  function draw(canvas, values, shape) {
    const [C, H, W] = shape;
    const B = values.length / (C * H * W);
    const cols = Math.min(GRID, B);
    const rows = Math.ceil(B / cols);
    canvas.width = cols * (W + 2) * SCALE;
    canvas.height = rows * (H + 2) * SCALE;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(canvas.width, canvas.height);
    image.data.fill(255);
    for (let b = 0; b < B; b++) {
      const x0 = (b % cols) * (W + 2) + 1;
      const y0 = Math.floor(b / cols) * (H + 2) + 1;
      for (let y = 0; y < H; y++) {
        for (let x = 0; x < W; x++) {
          const v = values[b * C * H * W + y * W + x]; // the first channel: the digits are grey
          const g = Math.round((Math.min(1, Math.max(-1, v)) + 1) * 127.5);
          for (let dy = 0; dy < SCALE; dy++) {
            for (let dx = 0; dx < SCALE; dx++) {
              const p = 4 * (((y0 + y) * SCALE + dy) * canvas.width + (x0 + x) * SCALE + dx);
              image.data[p] = image.data[p + 1] = image.data[p + 2] = g;
            }
          }
        }
      }
    }
    ctx.putImageData(image, 0, 0);
  }

  function show(index) {
    const frame = frames[index];
    if (!frame) return;
    draw($("xt"), frame.x_t, frame.shape);
    draw($("x0"), frame.x0, frame.shape);
    $("t-readout").textContent = frame.t >= 0 ? `t = ${frame.t}` : "the sample";
  }

  async function run({ model, xT, labels = null, w = 0, steps = 20, solver = "ddim", onStep = null }) {
    const { worker, meta } = await load(model);
    const shape = meta.image_shape;
    return new Promise((resolve, reject) => {
      worker.onmessage = (e) => {
        const m = e.data;
        if (m.type === "step") onStep?.({ ...m, shape });
        else if (m.type === "done") resolve(m.x);
        else if (m.type === "error") reject(new Error(m.message));
      };
      worker.postMessage({ type: "sample", xT: Float32Array.from(xT), labels, w, steps, solver });
    });
  }

  async function sampleClicked() {
    const button = $("sample");
    button.disabled = true;
    $("slider-row").hidden = true;
    try {
      const conditional = $("model").value === "mnist_cfg";
      const model = $("model").value;
      const steps = Math.max(1, Math.min(1000, parseInt($("steps").value, 10) || 20));
      const seed = parseInt($("seed").value, 10) || 0;
      const { meta } = await load(model);
      const n = GRID * GRID;
      const xT = gaussian(seed, n * meta.image_shape.reduce((a, b) => a * b, 1));
      const labels = conditional ? Array(n).fill(parseInt($("digit").value, 10)) : null;
      const w = conditional ? parseFloat($("w").value) || 0 : 0;
      const solver = $("solver").value;
      frames = [];
      const start = performance.now();
      const x = await run({
        model, xT, labels, w, steps, solver,
        onStep: (m) => {
          frames.push({ t: m.t, x_t: m.x_t, x0: m.x0, shape: m.shape });
          show(frames.length - 1);
          $("progress").textContent = `step ${m.index + 1} of ${m.steps} (t = ${m.t})`;
        },
      });
      frames.push({ t: -1, x_t: x, x0: x, shape: meta.image_shape });
      show(frames.length - 1);
      const seconds = (performance.now() - start) / 1000;
      const evaluations = steps * (conditional && w !== 0 ? 2 : 1);
      const name = $("solver").selectedOptions[0].textContent; // the menu make site writes from ddpm_lib's registry
      $("progress").textContent = `${n} digits, ${steps} ${name} steps (${evaluations} network evaluations of the batch) in ${seconds.toFixed(1)} s`;
      const slider = $("t-slider");
      slider.max = String(frames.length - 1);
      slider.value = slider.max;
      $("slider-row").hidden = false;
      document.body.dataset.state = "done";
    } catch (e) {
      $("progress").textContent = `error: ${e.message}`;
      document.body.dataset.state = "error";
    } finally {
      button.disabled = false;
    }
  }

  window.ddpmSampler = { run, gaussian, frames: () => frames };
  window.addEventListener("DOMContentLoaded", () => {
    const params = new URLSearchParams(location.search);
    if (params.has("embed")) document.body.classList.add("embedded"); // inside a notebook's page
    if (params.get("model")) $("model").value = params.get("model");
    $("cfg-controls").hidden = $("model").value !== "mnist_cfg";
    if (location.protocol === "file:") {
      $("progress").textContent =
        "This browser does not run the sampler from a file: serve the site with `python -m http.server -d site` and open http://localhost:8000/sampler.html.";
    }
    $("model").addEventListener("change", () => ($("cfg-controls").hidden = $("model").value !== "mnist_cfg"));
    $("sample").addEventListener("click", sampleClicked);
    $("t-slider").addEventListener("input", () => show(parseInt($("t-slider").value, 10)));
    document.body.dataset.state = "idle";
  });
})();
