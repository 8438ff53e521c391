// A whole image's uncertainty overview: the image's coarse level in grey, the uncertainty (mean acquisition
// score per pixel, from the service's multiscale uncertainty OME-Zarr; never-scored pixels stay clear) as a heat
// map over it, and the listed patches as outlines, the open one highlighted. One canvas pixel per overview pixel.
import { fromNdarray } from "./rpc.js";
import { heat, percentiles } from "./patch-view.js";

/** The middle plane of a (Z, Y, X) array, or the (Y, X) array itself, as {data, height, width}. */
function plane(array, leading = 0) {
  const shape = array.shape.slice(leading), [height, width] = shape.slice(-2), size = height * width;
  const z = shape.length === 3 ? Math.floor(shape[0] / 2) : 0;
  return { data: array.data.subarray(z * size, (z + 1) * size), height, width };
}

export class OverviewView {
  constructor(canvas) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.showUncertainty = true;
    this.overview = null;
    this.patches = [];
    this.current = null;
  }

  /** `answer` from get_overview. */
  show(answer) {
    const uncertainty = plane(fromNdarray(answer.uncertainty));
    this.overview = {
      uncertainty, factors: answer.uncertainty_factors.slice(-2), imageId: answer.image_id,
      image: answer.image ? plane(fromNdarray(answer.image), 1) : null,
      imageFactors: answer.image_factors ? answer.image_factors.slice(-2) : null,
    };
    this.canvas.width = uncertainty.width;
    this.canvas.height = uncertainty.height;
    this.uncertaintyTop = percentiles(uncertainty.data, 0, 0.99)[1];
    if (this.overview.image) [this.low, this.high] = percentiles(this.overview.image.data);
    this.render();
  }

  /** The patches to outline (those of the shown image) and the open one's id. */
  setPatches(patches, current) {
    this.patches = patches;
    this.current = current;
    this.render();
  }

  render() {
    if (!this.overview) return;
    const { uncertainty, factors, image, imageFactors } = this.overview;
    const { width, height } = uncertainty;
    const pixels = this.context.createImageData(width, height), out = pixels.data;
    const scale = image ? 255 / (this.high - this.low) : 0;
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const i = y * width + x;
        let r = 40, g = 40, b = 40;
        if (image) { // the image level's pixel under this overview pixel's centre
          const iy = Math.min(image.height - 1, Math.floor((y + 0.5) * factors[0] / imageFactors[0]));
          const ix = Math.min(image.width - 1, Math.floor((x + 0.5) * factors[1] / imageFactors[1]));
          r = g = b = Math.max(0, Math.min(255, (image.data[iy * image.width + ix] - this.low) * scale));
        }
        const u = uncertainty.data[i];
        if (this.showUncertainty && Number.isFinite(u) && this.uncertaintyTop > 0) {
          const t = Math.min(1, Math.max(0, u) / this.uncertaintyTop), [hr, hg, hb] = heat(t), a = 0.25 + 0.6 * t;
          r = r * (1 - a) + hr * a; g = g * (1 - a) + hg * a; b = b * (1 - a) + hb * a;
        }
        out[4 * i] = r; out[4 * i + 1] = g; out[4 * i + 2] = b; out[4 * i + 3] = 255;
      }
    }
    this.context.putImageData(pixels, 0, 0);
    for (const patch of this.patches) {
      if (patch.image_id !== this.overview.imageId) continue;
      const [y, x] = patch.origin.slice(-2), [h, w] = patch.shape.slice(-2);
      this.context.strokeStyle = patch.id === this.current ? "#2f6fdb" : "rgba(255,255,255,0.6)";
      this.context.lineWidth = patch.id === this.current ? 2 : 1;
      this.context.strokeRect(x / factors[1], y / factors[0], Math.max(1, w / factors[1]), Math.max(1, h / factors[0]));
    }
  }
}
