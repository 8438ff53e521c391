// The connection to the bioadapt service (hypha-rpc, bundled in ../vendor) and numpy arrays as they travel.
import { hyphaWebsocketClient } from "../vendor/hypha-rpc/hypha-rpc-websocket.min.mjs";

export const FINISHED = ["done", "failed", "cancelled"];

/** Connect into the service's workspace and get the "bioadapt" service. */
export async function connect({ serverUrl, workspace, token }) {
  const config = { server_url: serverUrl, method_timeout: 300 };
  if (workspace) config.workspace = workspace;
  if (token) config.token = token;
  const server = await hyphaWebsocketClient.connectToServer(config);
  const service = await server.getService("bioadapt");
  return { server, service };
}

/** A readable message from a remote error: the "BioadaptError: ..." / "AccessDenied: ..." line when there is one
 * (the last one: the remote traceback quotes the raising source line before the message itself). */
export function errorMessage(error) {
  const text = String((error && error.message) || error);
  for (const pattern of [/(BioadaptError|AccessDenied): [^\n]*/g, /Permission denied[^\n]*/g]) {
    const found = text.match(pattern);
    if (found) return found[found.length - 1];
  }
  return text.replace(/^(Error: )?RemoteError:\s*/, "").split("\n").find((line) => line.trim()) || text;
}

const TYPED = {
  bool: Uint8Array, uint8: Uint8Array, int8: Int8Array, uint16: Uint16Array, int16: Int16Array,
  uint32: Uint32Array, int32: Int32Array, float32: Float32Array, float64: Float64Array,
  int64: BigInt64Array, uint64: BigUint64Array,
};

function bytesOf(value) {
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (Array.isArray(value)) { // chunks
    const parts = value.map(bytesOf);
    const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
    let at = 0;
    for (const part of parts) { out.set(part, at); at += part.byteLength; }
    return out;
  }
  throw new Error(`not array bytes: ${typeof value}`);
}

/** A numpy array received from Python ({_rtype: "ndarray", _rvalue, _rshape, _rdtype}) as
 * {data: TypedArray (a copy, aligned; 64-bit integers become Float64Array), shape, dtype}. */
export function fromNdarray(array) {
  if (!array || array._rtype !== "ndarray") throw new Error("expected a numpy array from the service");
  const Typed = TYPED[array._rdtype];
  if (!Typed) throw new Error(`unsupported dtype ${array._rdtype}`);
  const bytes = bytesOf(array._rvalue).slice(); // slice: a fresh buffer, aligned for the typed view
  let data = new Typed(bytes.buffer);
  if (data instanceof BigInt64Array || data instanceof BigUint64Array) data = Float64Array.from(data, Number);
  return { data, shape: Array.from(array._rshape), dtype: array._rdtype };
}

/** A typed array as a numpy array for Python: hypha-rpc passes a Uint8Array through as bytes, and an object that
 * already carries _rtype "ndarray" is sent as it is (numpy.frombuffer(bytes, dtype).reshape(shape) on arrival). */
export function toNdarray(typed, shape, dtype) {
  return {
    _rtype: "ndarray",
    _rvalue: new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength),
    _rshape: shape,
    _rdtype: dtype,
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Start a job (score / fine_tune) with a live progress callback and wait for its end; polls job_status too, so
 * a lost event never leaves the page waiting. `start(progress)` must pass `progress` to the service call.
 * Resolves with the final job record {state, result, error, progress}. */
export async function runJob(service, start, onProgress, pollMs = 2000) {
  let finished;
  const ended = new Promise((resolve) => { finished = resolve; });
  const progress = {
    _rintf: true, // an object marked _rintf outlives the call; a bare function would be dropped when it returns
    on_progress: (info) => {
      onProgress(info);
      if (FINISHED.includes(info.state)) finished();
    },
  };
  const started = await start(progress);
  for (;;) {
    const job = await service.job_status({ job_id: started.job_id });
    if (FINISHED.includes(job.state)) return job;
    onProgress({ job_id: job.id, state: job.state, ...job.progress });
    await Promise.race([ended, sleep(pollMs)]);
  }
}
