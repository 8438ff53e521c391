// The project's learning curve: held-out score against training labels, one segment per fine-tune from its
// parent's score to its own (both on the held-out patches of that moment), coloured by the verdict. An SVG, so
// each point carries its version, verdict and reason (its title is the tooltip).
const SVG = "http://www.w3.org/2000/svg";
const COLOURS = { better: "#2e9e44", same: "#7f7f7f", worse: "#d33c32", undecided: "#b0b0b0" };

function element(name, attributes, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  parent.appendChild(node);
  return node;
}

/** Draw get_project's learning_curve rows into ``svg`` (rows without both scores are left out). */
export function drawLearningCurve(svg, rows) {
  svg.replaceChildren();
  const width = 240, height = 110, left = 26, right = 8, top = 8, bottom = 20;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const drawn = rows.filter((r) => r.score != null && r.parent_score != null);
  element("rect", { x: left, y: top, width: width - left - right, height: height - top - bottom, fill: "none",
    stroke: "#c8ccd0" }, svg);
  const metric = (drawn.find((r) => r.metric) || {}).metric || "score";
  element("text", { x: left, y: height - 5, "font-size": 9, fill: "#68737d" }, svg).textContent =
    `training labels · held-out ${metric} (0 to 1)`;
  if (!drawn.length) {
    element("text", { x: left + 8, y: top + 40, "font-size": 10, fill: "#68737d" }, svg).textContent =
      "no fine-tuned version judged yet";
    return;
  }
  const most = Math.max(1, ...drawn.map((r) => Math.max(r.labels, r.parent_labels)));
  const x = (labels) => left + (width - left - right) * labels / most;
  const y = (score) => height - bottom - (height - top - bottom) * score;
  for (const row of drawn) {
    const colour = COLOURS[row.verdict] || COLOURS.undecided;
    element("line", { x1: x(row.parent_labels), y1: y(row.parent_score), x2: x(row.labels), y2: y(row.score),
      stroke: colour, "stroke-width": 2 }, svg);
    const point = element("circle", { cx: x(row.labels), cy: y(row.score), r: 3.5, fill: colour, class: "point",
      "data-version": row.version, "data-verdict": row.verdict }, svg);
    element("title", {}, point).textContent = `v${row.version} (${row.verdict}): ${row.reason}`;
    element("text", { x: x(row.labels) + 4, y: y(row.score) - 4, "font-size": 9, fill: colour }, svg)
      .textContent = `v${row.version}`;
  }
}

/** One sentence on a finished fine-tune's verdict against its parent, for the status line. */
export function verdictText(result) {
  const verdict = result.verdict || {};
  const said = `judged ${verdict.verdict || "not at all"} against version ${result.parent}`;
  if (verdict.verdict === "worse") {
    return `${said}: ${verdict.reason}. Kept but not used unless named; version ${result.default_version} stays ` +
      "the default.";
  }
  return verdict.reason ? `${said}: ${verdict.reason}` : said;
}
