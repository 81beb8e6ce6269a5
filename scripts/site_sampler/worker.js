// The live sampler's worker: onnxruntime-web runs the exported U-Net, and the solvers run here in
// JavaScript, step for step as ddpm_lib's do (ddpm_lib/solvers.py, denoiser.py): eps and x0 from the
// network's output, classifier-free guidance from one batched pass of 2B images (Ho & Salimans, Eq. 6),
// x0 clipped to [-1, 1] and the eps it implies, then a DDIM or DPM-Solver++(2M, 3M) step.
// Messages in: {type: "load", model, meta} and {type: "sample", xT, labels, w, steps, solver}; out: "ready",
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

// x0 from the network's output for x at alpha_bar (ddpm_lib.diffusion.to_eps_x0; its eps is not needed,
// since the clipped x0 below decides it).
function x0Of(output, x, aBar) {
  const s = Math.fround(Math.sqrt(aBar));
  const n = Math.fround(Math.sqrt(1 - aBar));
  const x0 = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    if (meta.prediction === "eps") x0[i] = (x[i] - n * output[i]) / s;
    else if (meta.prediction === "x0") x0[i] = output[i];
    else x0[i] = s * x[i] - n * output[i]; // v
  }
  return x0;
}

// eps and x0 at (x, t), as ddpm_lib's guided(...) gives them: classifier-free guidance toward the labels
// with weight w (one batched pass of 2B; x0 combined as eps is, both being affine in the output), then
// x0 clipped to [-1, 1] and the eps it implies (Clipped).
async function denoise(x, t, labels, w, B) {
  const aBar = meta.alpha_bar[t];
  const guide = meta.num_classes > 0 && labels;
  let x0;
  if (guide && w !== 0) {
    const both = new Float32Array(2 * x.length);
    both.set(x);
    both.set(x, x.length);
    const ys = [...labels, ...labels.map(() => meta.num_classes)]; // then "no label"
    const out = await network(both, t, ys, 2 * B);
    const c = x0Of(out.subarray(0, x.length), x, aBar);
    const u = x0Of(out.subarray(x.length), x, aBar);
    x0 = c.map((v, i) => (1 + w) * v - w * u[i]);
  } else {
    const ys = guide ? labels : Array(B).fill(meta.num_classes);
    x0 = x0Of(await network(x, t, ys, B), x, aBar);
  }
  const s = Math.fround(Math.sqrt(aBar));
  const n = Math.fround(Math.sqrt(1 - aBar));
  const eps = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    x0[i] = Math.min(1, Math.max(-1, x0[i]));
    eps[i] = (x[i] - s * x0[i]) / n;
  }
  return { eps, x0 };
}

// (lambda, alpha, sigma) at t; t = -1 is the data (ddpm_lib.solvers.lambda_alpha_sigma).
function lambdaAlphaSigma(t) {
  if (t < 0) return [Infinity, 1, 0];
  const alpha = Math.sqrt(meta.alpha_bar[t]);
  const sigma = Math.sqrt(1 - meta.alpha_bar[t]);
  return [Math.log(alpha / sigma), alpha, sigma];
}

// The data-prediction part of a DPM-Solver++ step of order 1, 2 or 3 (ddpm_lib.solvers.multistep_update).
function multistepUpdate(x0s, lams, lamNext, alphaNext, order) {
  const h = lamNext - lams[lams.length - 1];
  const phi1 = Math.expm1(-h);
  const m0 = x0s[x0s.length - 1];
  const out = new Float64Array(m0.length);
  for (let i = 0; i < m0.length; i++) out[i] = -alphaNext * phi1 * m0[i];
  if (order === 2) {
    const r0 = (lams[lams.length - 1] - lams[lams.length - 2]) / h;
    const m1 = x0s[x0s.length - 2];
    for (let i = 0; i < m0.length; i++) out[i] -= (0.5 * alphaNext * phi1 * (m0[i] - m1[i])) / r0;
  } else if (order === 3) {
    const n = lams.length;
    const r0 = (lams[n - 1] - lams[n - 2]) / h;
    const r1 = (lams[n - 2] - lams[n - 3]) / h;
    const m1 = x0s[x0s.length - 2];
    const m2 = x0s[x0s.length - 3];
    for (let i = 0; i < m0.length; i++) {
      const d10 = (m0[i] - m1[i]) / r0;
      const d11 = (m1[i] - m2[i]) / r1;
      const d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11);
      const d2 = (2 * (d10 - d11)) / (r0 + r1); // h^2 x0''
      out[i] += alphaNext * (phi1 / h + 1) * d1 + alphaNext * (0.5 - (phi1 + h) / (h * h)) * d2;
    }
  }
  return out;
}

// The order of DPM-Solver++ step i of n: limited by the history; (3M) drops to 2 on the second-to-last
// step when n < 15, as ddpm_lib and diffusers do.
function stepOrder(solver, i, n) {
  const order = solver === "dpmpp3m" ? (n < 15 && i === n - 2 ? 2 : 3) : 2;
  return Math.min(order, i + 1);
}

const SOLVERS = ["ddim", "dpmpp2m", "dpmpp3m"];

async function sample({ xT, labels, w, steps, solver = "ddim" }) {
  if (!SOLVERS.includes(solver)) throw new Error(`unknown solver ${solver}; valid: ${SOLVERS.join(", ")}`);
  const [C, H, W] = meta.image_shape;
  const B = xT.length / (C * H * W);
  const timesteps = ddimTimesteps(meta.T, steps); // every solver here uses the same trailing grid
  let x = Float32Array.from(xT);
  const x0s = [];
  const lams = [];
  for (let k = 0; k < timesteps.length; k++) {
    const t = timesteps[k];
    const tNext = k + 1 < timesteps.length ? timesteps[k + 1] : -1;
    const { eps, x0 } = await denoise(x, t, labels, w, B);
    self.postMessage({ type: "step", t, index: k, steps: timesteps.length, x_t: x, x0 });
    const next = new Float32Array(x.length);
    if (solver === "ddim") {
      // DDIM, eta = 0 (Eq. 12): x_{t_next} = sqrt(alpha_bar_next) x0 + sqrt(1 - alpha_bar_next) eps
      const aBarNext = tNext >= 0 ? meta.alpha_bar[tNext] : 1.0;
      const a = Math.sqrt(aBarNext);
      const b = Math.sqrt(Math.max(1 - aBarNext, 0));
      for (let i = 0; i < x.length; i++) next[i] = a * x0[i] + b * eps[i];
    } else {
      // DPM-Solver++ (Lu et al. 2022, Alg. 2): the linear part exactly, x0 a polynomial in lambda
      const [lam, , sigma] = lambdaAlphaSigma(t);
      x0s.push(x0);
      lams.push(lam);
      if (x0s.length > 3) {
        x0s.shift();
        lams.shift();
      }
      if (tNext < 0) {
        x = x0; // to the data: the last prediction (first order)
        break;
      }
      const [lamNext, alphaNext, sigmaNext] = lambdaAlphaSigma(tNext);
      const update = multistepUpdate(x0s, lams, lamNext, alphaNext, stepOrder(solver, k, timesteps.length));
      for (let i = 0; i < x.length; i++) next[i] = (sigmaNext / sigma) * x[i] + update[i];
    }
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
