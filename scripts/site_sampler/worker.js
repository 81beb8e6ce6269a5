// The live sampler's worker: onnxruntime-web runs the exported U-Net, and DDIM (Song et al. 2021, Eq. 12)
// runs here in JavaScript, step for step as ddpm_lib's sampler does it (ddpm_lib/solvers.py, denoiser.py):
// eps and x0 from the network's output, classifier-free guidance from one batched pass of 2B images
// (Ho & Salimans, Eq. 6), x0 clipped to [-1, 1] and the eps it implies, then the DDIM update.
// Messages in: {type: "load", model, meta} and {type: "sample", xT, labels, w, steps}; out: "ready",
// "step" (t, x_t, x0 after each network evaluation), "done" (the sample) and "error".
importScripts("../ort/ort.wasm.min.js");
ort.env.wasm.wasmPaths = new URL("../ort/", self.location.href).href;
ort.env.wasm.numThreads = 1; // the plain single-threaded build: no cross-origin isolation needed

let session = null;
let meta = null;

// Python's round(): halves go to the even neighbour.
function roundHalfEven(v) {
  const f = Math.floor(v);
  const d = v - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

// The timesteps DDIM visits, high to low, "trailing" (ddpm_lib.sampling.ddim_timesteps).
function ddimTimesteps(T, steps) {
  const ts = [];
  for (let i = 0; i < steps; i++) ts.push(roundHalfEven(T - (i * T) / steps) - 1);
  return ts;
}

async function network(x, t, labels, batch) {
  const [C, H, W] = meta.image_shape;
  const feeds = {
    x: new ort.Tensor("float32", x, [batch, C, H, W]),
    t: new ort.Tensor("int64", BigInt64Array.from({ length: batch }, () => BigInt(t)), [batch]),
  };
  if (meta.num_classes) feeds.y = new ort.Tensor("int64", BigInt64Array.from(labels, (v) => BigInt(v)), [batch]);
  const out = await session.run(feeds);
  return out.prediction.data;
}

// eps and x0 of one image's worth of values from the network's output (ddpm_lib.diffusion.to_eps_x0).
function epsX0(output, x, aBar) {
  const s = Math.fround(Math.sqrt(aBar));
  const n = Math.fround(Math.sqrt(1 - aBar));
  const eps = new Float32Array(x.length);
  const x0 = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    if (meta.prediction === "eps") {
      eps[i] = output[i];
      x0[i] = (x[i] - n * output[i]) / s;
    } else if (meta.prediction === "x0") {
      x0[i] = output[i];
      eps[i] = (x[i] - s * output[i]) / n;
    } else {
      x0[i] = s * x[i] - n * output[i];
      eps[i] = (x[i] - s * x0[i]) / n;
    }
  }
  return { eps, x0 };
}

async function sample({ xT, labels, w, steps }) {
  const [C, H, W] = meta.image_shape;
  const size = C * H * W;
  const B = xT.length / size;
  const guide = meta.num_classes > 0 && labels;
  const timesteps = ddimTimesteps(meta.T, steps);
  let x = Float32Array.from(xT);
  for (let k = 0; k < timesteps.length; k++) {
    const t = timesteps[k];
    const tPrev = k + 1 < timesteps.length ? timesteps[k + 1] : -1;
    const aBar = meta.alpha_bar[t];
    const aBarPrev = tPrev >= 0 ? meta.alpha_bar[tPrev] : 1.0;
    let eps, x0;
    if (guide && w !== 0) {
      const both = new Float32Array(2 * x.length);
      both.set(x);
      both.set(x, x.length);
      const ys = [...labels, ...labels.map(() => meta.num_classes)]; // then "no label"
      const out = await network(both, t, ys, 2 * B);
      const c = epsX0(out.subarray(0, x.length), x, aBar);
      const u = epsX0(out.subarray(x.length), x, aBar);
      eps = new Float32Array(x.length);
      x0 = new Float32Array(x.length);
      for (let i = 0; i < x.length; i++) {
        eps[i] = (1 + w) * c.eps[i] - w * u.eps[i];
        x0[i] = (1 + w) * c.x0[i] - w * u.x0[i];
      }
    } else {
      const ys = guide ? labels : Array(B).fill(meta.num_classes);
      ({ eps, x0 } = epsX0(await network(x, t, ys, B), x, aBar));
    }
    // x0 clipped to the data range, and the eps it implies (ddpm_lib.denoiser.Clipped)
    const s = Math.fround(Math.sqrt(aBar));
    const n = Math.fround(Math.sqrt(1 - aBar));
    for (let i = 0; i < x.length; i++) {
      x0[i] = Math.min(1, Math.max(-1, x0[i]));
      eps[i] = (x[i] - s * x0[i]) / n;
    }
    self.postMessage({ type: "step", t, index: k, steps: timesteps.length, x_t: x, x0 });
    // DDIM, eta = 0 (Eq. 12): x_{t_prev} = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev) eps
    const a = Math.sqrt(aBarPrev);
    const b = Math.sqrt(Math.max(1 - aBarPrev, 0));
    const next = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++) next[i] = a * x0[i] + b * eps[i];
    x = next;
  }
  self.postMessage({ type: "done", x });
}

self.onmessage = async (event) => {
  try {
    if (event.data.type === "load") {
      meta = event.data.meta;
      session = await ort.InferenceSession.create(event.data.model, { executionProviders: ["wasm"] });
      self.postMessage({ type: "ready" });
    } else if (event.data.type === "sample") {
      await sample(event.data);
    }
  } catch (e) {
    self.postMessage({ type: "error", message: String(e && e.message ? e.message : e) });
  }
};
