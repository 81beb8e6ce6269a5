// The live sampler's worker: onnxruntime-web runs the exported U-Net, and the solvers run here in
// JavaScript, step for step as ddpm_lib's do (ddpm_lib/solvers.py, denoiser.py): the grid of points
// (t, alpha, sigma) read from the export's path (ddpm_lib/paths.py, export), eps and x0 from the network's
// output by the export's parametrization (ddpm_lib/parametrizations.py), classifier-free guidance from one
// batched pass of 2B images (Ho & Salimans, Eq. 6), x0 clipped to [-1, 1] and the eps it implies, then a
// DDIM or DPM-Solver++(2M, 3M) step. An export this page does not know (a grid, a parametrization or a
// time type it lacks) is refused at load, with a message the page shows.
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

// The timesteps a solver visits on a discrete schedule, high to low, "trailing" (ddpm_lib.paths.ddim_timesteps).
function ddimTimesteps(T, steps) {
  const ts = [];
  for (let i = 0; i < steps; i++) ts.push(roundHalfEven(T - (i * T) / steps) - 1);
  return ts;
}

// The grid of a step count: steps + 1 points {t, alpha, sigma, scale}, pure noise first, the data last
// (ddpm_lib.paths: VP.grid for a "trailing" export, LinearFlow.grid for a "uniform" one).
const GRIDS = {
  trailing: (path, steps) => [...ddimTimesteps(path.points.length, steps).map((t) => path.points[t]), path.data],
  uniform: (path, steps) =>
    Array.from({ length: steps + 1 }, (_, i) => {
      const [alpha, sigma] = [1, 2].map((k) => path.noise[k] + (i / steps) * (path.data[k] - path.noise[k]));
      return [path.noise[0] + (i / steps) * (path.data[0] - path.noise[0]), alpha, sigma, 1 / Math.sqrt(alpha * alpha + sigma * sigma)];
    }),
};

function grid(steps) {
  return GRIDS[meta.path.grid](meta.path, steps).map(([t, alpha, sigma, scale]) => ({ t, alpha, sigma, scale }));
}

// x0 from the network's output u for x at (alpha, sigma), in float32 (ddpm_lib.parametrizations.PARAMETRIZATIONS;
// eps is not needed, since the clipped x0 below decides it).
const PARAMETRIZATIONS = {
  eps: (u, x, a, s) => (x - s * u) / a,
  x0: (u) => u,
  v: (u, x, a, s) => (a * x - s * u) / Math.fround(a * a + s * s),
  velocity: (u, x, a, s) => (x - s * u) / Math.fround(a + s),
};
// The network's t input for a batch, in the export's time type (int64 VP timesteps, float32 continuous times).
const TIME_TYPES = {
  int64: (t, batch) => BigInt64Array.from({ length: batch }, () => BigInt(t)),
  float32: (t, batch) => new Float32Array(batch).fill(t),
};

// Refuse, with a message the page shows, an export whose grid, parametrization or time type this page lacks.
function check(meta) {
  const known = [
    ["grid", meta.path && meta.path.grid, GRIDS],
    ["parametrization", meta.prediction, PARAMETRIZATIONS],
    ["time type", meta.t_type, TIME_TYPES],
  ];
  for (const [what, name, table] of known) {
    if (!Object.hasOwn(table, name)) {
      throw new Error(`this model's ${what} ${name} is unknown to this page (it knows ${Object.keys(table).join(", ")}); re-export it with this version of ddpm_lib`);
    }
  }
}

async function network(x, p, labels, batch) {
  const [C, H, W] = meta.image_shape;
  const input = p.scale === 1 ? x : x.map((v) => v * p.scale);
  const feeds = {
    x: new ort.Tensor("float32", input, [batch, C, H, W]),
    t: new ort.Tensor(meta.t_type, TIME_TYPES[meta.t_type](p.t, batch), [batch]),
  };
  if (meta.num_classes) feeds.y = new ort.Tensor("int64", BigInt64Array.from(labels, (v) => BigInt(v)), [batch]);
  const out = await session.run(feeds);
  return out.prediction.data;
}

function x0Of(output, x, p) {
  const a = Math.fround(p.alpha);
  const s = Math.fround(p.sigma);
  const toX0 = PARAMETRIZATIONS[meta.prediction];
  const x0 = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) x0[i] = toX0(output[i], x[i], a, s);
  return x0;
}

// eps and x0 at (x, t), as ddpm_lib's guided(...) gives them: classifier-free guidance toward the labels
// with weight w (one batched pass of 2B; x0 combined as eps is, both being affine in the output), then
// x0 clipped to [-1, 1] and the eps it implies (Clipped).
async function denoise(x, p, labels, w, B) {
  const guide = meta.num_classes > 0 && labels;
  let x0;
  if (guide && w !== 0) {
    const both = new Float32Array(2 * x.length);
    both.set(x);
    both.set(x, x.length);
    const ys = [...labels, ...labels.map(() => meta.num_classes)]; // then "no label"
    const out = await network(both, p, ys, 2 * B);
    const c = x0Of(out.subarray(0, x.length), x, p);
    const u = x0Of(out.subarray(x.length), x, p);
    x0 = c.map((v, i) => (1 + w) * v - w * u[i]);
  } else {
    const ys = guide ? labels : Array(B).fill(meta.num_classes);
    x0 = x0Of(await network(x, p, ys, B), x, p);
  }
  const a = Math.fround(p.alpha);
  const s = Math.fround(p.sigma);
  const eps = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    x0[i] = Math.min(1, Math.max(-1, x0[i]));
    eps[i] = (x[i] - a * x0[i]) / s;
  }
  return { eps, x0 };
}

// lambda = log(alpha / sigma) of a point: -inf at pure noise, inf at the data (ddpm_lib.paths.GridPoint.lam).
function lam(p) {
  if (p.sigma === 0) return Infinity;
  if (p.alpha === 0) return -Infinity;
  return Math.log(p.alpha / p.sigma);
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
  const points = grid(steps); // every solver here uses the same grid
  let x = Float32Array.from(xT);
  const x0s = [];
  const lams = [];
  for (let k = 0; k + 1 < points.length; k++) {
    const [p, pNext] = [points[k], points[k + 1]];
    const { eps, x0 } = await denoise(x, p, labels, w, B);
    self.postMessage({ type: "step", t: p.t, index: k, steps: steps, x_t: x, x0 });
    const next = new Float32Array(x.length);
    if (solver === "ddim") {
      // DDIM, eta = 0 (Eq. 12): x_next = alpha_next x0 + sigma_next eps
      for (let i = 0; i < x.length; i++) next[i] = pNext.alpha * x0[i] + pNext.sigma * eps[i];
    } else {
      // DPM-Solver++ (Lu et al. 2022, Alg. 2): the linear part exactly, x0 a polynomial in lambda
      x0s.push(x0);
      lams.push(lam(p));
      if (x0s.length > 3) {
        x0s.shift();
        lams.shift();
      }
      if (pNext.sigma === 0) {
        x = x0; // to the data: the last prediction (first order)
        break;
      }
      const update = multistepUpdate(x0s, lams, lam(pNext), pNext.alpha, stepOrder(solver, k, steps));
      for (let i = 0; i < x.length; i++) next[i] = (pNext.sigma / p.sigma) * x[i] + update[i];
    }
    x = next;
  }
  self.postMessage({ type: "done", x });
}

self.onmessage = async (event) => {
  try {
    if (event.data.type === "load") {
      check(event.data.meta);
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
