// One patch on a canvas: the image with a contrast stretch, labels as a coloured overlay, uncertainty as a heat
// map; brush / eraser painting into an editable copy of the labels. The canvas holds one pixel per patch pixel
// and is scaled up by CSS, so mouse positions map to patch pixels by proportion.

/** A label id's colour: hues spread by the golden ratio, so neighbours differ. */
export function labelColor(id) {
  const hue = (id * 0.618033988749895) % 1;
  const [r, g, b] = hsvToRgb(hue, 0.75, 1);
  return [r, g, b];
}

function hsvToRgb(h, s, v) {
  const i = Math.floor(h * 6), f = h * 6 - i, p = v * (1 - s), q = v * (1 - f * s), t = v * (1 - (1 - f) * s);
  const [r, g, b] = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return [Math.round(r * 255), Math.round(g * 255), Math.round(b * 255)];
}

/** Heat-map colour for t in [0, 1]: red to yellow (its opacity grows with t, so calm pixels stay untouched). */
export function heat(t) {
  return [255, Math.round(230 * t), 0];
}

/** The [low, high] percentiles of a plane, for the contrast stretch. */
export function percentiles(values, low = 0.005, high = 0.995) {
  const sorted = Float64Array.from(values).filter((v) => Number.isFinite(v)).sort();
  if (!sorted.length) return [0, 1];
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * (sorted.length - 1)))];
  const lo = at(low), hi = at(high);
  return hi > lo ? [lo, hi] : [lo, lo + 1];
}

export class PatchView {
  constructor(canvas) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.patch = null;
    this.tool = "brush";
    this.labelId = 1;
    this.brushSize = 5;
    this.showLabels = true;
    this.showUncertainty = false;
    this.labelOpacity = 0.45;
    this.z = 0;
    this.edited = false;
    this.onChange = () => {};
    this._last = null;
    canvas.addEventListener("pointerdown", (e) => this._down(e));
    canvas.addEventListener("pointermove", (e) => this._move(e));
    canvas.addEventListener("pointerup", (e) => this._up(e));
    canvas.addEventListener("pointercancel", (e) => this._up(e));
  }

  /** Show a patch: {image: {data, shape (C, [Z,] Y, X)}, labels: {data, shape}, uncertainty: {data, shape}}; the
   * labels are copied (as uint32) and become the editable layer. */
  show(patch) {
    const spatial = patch.labels.shape;
    this.height = spatial[spatial.length - 2];
    this.width = spatial[spatial.length - 1];
    this.depth = spatial.length === 3 ? spatial[0] : 1;
    this.patch = patch;
    this.labels = Uint32Array.from(patch.labels.data);
    this.channel = 0;
    this.z = Math.floor(this.depth / 2);
    this.edited = false;
    this.canvas.width = this.width;
    this.canvas.height = this.height;
    this._stretch();
    this.render();
  }

  get planeSize() { return this.width * this.height; }

  setChannel(channel) { this.channel = channel; this._stretch(); this.render(); }

  setZ(z) { this.z = Math.max(0, Math.min(this.depth - 1, z)); this._stretch(); this.render(); }

  /** The largest label id + 1 (over the whole patch), made the current label. */
  newLabel() {
    let max = 0;
    for (const v of this.labels) if (v > max) max = v;
    this.labelId = max + 1;
    this.tool = "brush";
    this.onChange();
    return this.labelId;
  }

  reset() {
    this.labels = Uint32Array.from(this.patch.labels.data);
    this.edited = false;
    this.render();
    this.onChange();
  }

  _imagePlane() {
    const { data, shape } = this.patch.image;
    const channels = shape[0];
    const offset = (Math.min(this.channel, channels - 1) * this.depth + this.z) * this.planeSize;
    return data.subarray(offset, offset + this.planeSize);
  }

  /** Contrast limits of the image plane, and the uncertainty level shown as full heat (its 99th percentile:
   * a few extreme pixels must not leave the rest of the map black). */
  _stretch() {
    [this.low, this.high] = percentiles(this._imagePlane());
    const base = this.z * this.planeSize;
    const plane = this.patch.uncertainty.data.subarray(base, base + this.planeSize);
    this.uncertaintyTop = percentiles(plane, 0, 0.99)[1];
  }

  render() {
    if (!this.patch) return;
    const n = this.planeSize, base = this.z * n;
    const pixels = this.context.createImageData(this.width, this.height);
    const out = pixels.data;
    const image = this._imagePlane();
    const scale = 255 / (this.high - this.low);
    const uncertainty = this.patch.uncertainty.data, uTop = this.uncertaintyTop;
    const colors = new Map();
    for (let i = 0; i < n; i++) {
      const gray = Math.max(0, Math.min(255, (image[i] - this.low) * scale));
      let r = gray, g = gray, b = gray;
      if (this.showUncertainty && uTop > 0) {
        const u = Math.min(1, Math.max(0, uncertainty[base + i]) / uTop);
        const [hr, hg, hb] = heat(u);
        const a = 0.75 * u;
        r = r * (1 - a) + hr * a; g = g * (1 - a) + hg * a; b = b * (1 - a) + hb * a;
      }
      const id = this.labels[base + i];
      if (this.showLabels && id) {
        let color = colors.get(id);
        if (!color) colors.set(id, (color = labelColor(id)));
        const a = this.labelOpacity;
        r = r * (1 - a) + color[0] * a; g = g * (1 - a) + color[1] * a; b = b * (1 - a) + color[2] * a;
      }
      out[4 * i] = r; out[4 * i + 1] = g; out[4 * i + 2] = b; out[4 * i + 3] = 255;
    }
    this.context.putImageData(pixels, 0, 0);
  }

  /** The patch pixel (x, y) under a pointer event. */
  pixelAt(event) {
    const box = this.canvas.getBoundingClientRect();
    return [(event.clientX - box.left) / box.width * this.width, (event.clientY - box.top) / box.height * this.height];
  }

  /** Paint a disc of diameter brushSize centred on patch position (x, y) with the current tool. */
  paint(x, y) {
    const value = this.tool === "eraser" ? 0 : this.labelId;
    const radius = this.brushSize / 2;
    const cx = Math.floor(x), cy = Math.floor(y), reach = Math.ceil(radius);
    const base = this.z * this.planeSize;
    for (let dy = -reach; dy <= reach; dy++) {
      for (let dx = -reach; dx <= reach; dx++) {
        const px = cx + dx, py = cy + dy;
        if (px < 0 || py < 0 || px >= this.width || py >= this.height) continue;
        if (dx * dx + dy * dy > radius * radius) continue;
        this.labels[base + py * this.width + px] = value;
      }
    }
    this.edited = true;
  }

  /** Paint along the segment from (x0, y0) to (x1, y1), a disc every pixel. */
  stroke(x0, y0, x1, y1) {
    const steps = Math.max(1, Math.ceil(Math.max(Math.abs(x1 - x0), Math.abs(y1 - y0))));
    for (let s = 0; s <= steps; s++) this.paint(x0 + (x1 - x0) * s / steps, y0 + (y1 - y0) * s / steps);
  }

  _down(event) {
    if (!this.patch || event.button !== 0) return;
    this.canvas.setPointerCapture(event.pointerId);
    this._last = this.pixelAt(event);
    this.paint(...this._last);
    this.render();
  }

  _move(event) {
    if (!this._last) return;
    const here = this.pixelAt(event);
    this.stroke(...this._last, ...here);
    this._last = here;
    this.render();
  }

  _up(event) {
    if (!this._last) return;
    this._last = null;
    try { this.canvas.releasePointerCapture(event.pointerId); } catch (_) { /* already released */ }
    this.onChange();
  }
}
