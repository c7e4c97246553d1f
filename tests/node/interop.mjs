// A gradserve client in Node.js, built from protos/ alone (no generated code, no SDK).
//
//   node tests/node/interop.mjs <port> [host]
//
// Creates a model, runs a fused Backward, a Step (sent twice with one request_id), a Train run
// read as a stream, GetParameters and a Forward, and prints one JSON document on stdout with the
// inputs it sent and everything it got back. tests/test_interop.py runs the same calls through
// the Python SDK on a twin model and compares the two. Exit status 1 (message on stderr) on error.

import { Buffer } from "node:buffer";
import { endianness } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTOS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");
const CALL_SECONDS = 30;
const TRAIN_SECONDS = 120;
const LITTLE_ENDIAN_HOST = endianness() === "LE";

// ------------------------------------------------------------------------------ the contract

// google/protobuf/struct.proto is not under protos/: proto-loader supplies it from its bundled
// well-known types.
const definition = protoLoader.loadSync("gradserve/v1/gradserve.proto", {
  includeDirs: [PROTOS],
  keepCase: true, // field names as in the .proto (model_id), not camelCase
  longs: String, // int64 arrives as a decimal string: exact beyond 2**53
  enums: String, // "DTYPE_FLOAT32" rather than 1
  defaults: true, // unset scalars read as their zero value, as in every proto3 runtime
  oneofs: true, // sets a virtual property naming the member present, e.g. _loss: "loss"
});
const { GradientService } = grpc.loadPackageDefinition(definition).gradserve.v1;

// ------------------------------------------------------------------------------ tensors

// Wire dtype -> element size and the typed array that holds it (see docs/interop.md).
const DTYPES = {
  DTYPE_FLOAT32: { size: 4, array: Float32Array, read: "readFloatLE", write: "writeFloatLE" },
  DTYPE_FLOAT64: { size: 8, array: Float64Array, read: "readDoubleLE", write: "writeDoubleLE" },
  DTYPE_INT8: { size: 1, array: Int8Array, read: "readInt8", write: "writeInt8" },
  DTYPE_INT16: { size: 2, array: Int16Array, read: "readInt16LE", write: "writeInt16LE" },
  DTYPE_INT32: { size: 4, array: Int32Array, read: "readInt32LE", write: "writeInt32LE" },
  DTYPE_INT64: { size: 8, array: BigInt64Array, read: "readBigInt64LE", write: "writeBigInt64LE" },
  DTYPE_UINT8: { size: 1, array: Uint8Array, read: "readUInt8", write: "writeUInt8" },
  DTYPE_BOOL: { size: 1, array: Uint8Array, read: "readUInt8", write: "writeUInt8" },
};

const DTYPE_OF_ARRAY = new Map([
  [Float32Array, "DTYPE_FLOAT32"], [Float64Array, "DTYPE_FLOAT64"], [Int8Array, "DTYPE_INT8"],
  [Int16Array, "DTYPE_INT16"], [Int32Array, "DTYPE_INT32"], [BigInt64Array, "DTYPE_INT64"],
  [Uint8Array, "DTYPE_UINT8"],
]);

/** A typed array and its shape -> a Tensor message (little-endian bytes, C order). */
function encodeTensor(values, shape) {
  const dtype = DTYPE_OF_ARRAY.get(values.constructor);
  if (dtype === undefined) throw new TypeError(`no wire dtype for ${values.constructor.name}`);
  const count = shape.reduce((a, b) => a * b, 1);
  if (values.length !== count) {
    throw new RangeError(`shape [${shape}] needs ${count} elements, got ${values.length}`);
  }
  let data;
  if (LITTLE_ENDIAN_HOST) {
    // The typed array's memory already is the wire format: share it.
    data = Buffer.from(values.buffer, values.byteOffset, values.byteLength);
  } else {
    const { size, write } = DTYPES[dtype];
    data = Buffer.alloc(values.length * size);
    values.forEach((v, i) => data[write](v, i * size));
  }
  return { dtype, shape, data };
}

/** A Tensor message -> { dtype, shape, values (typed array), data (base64) }. */
function decodeTensor(msg) {
  const spec = DTYPES[msg.dtype];
  if (spec === undefined) throw new TypeError(`unsupported dtype ${msg.dtype}`);
  const shape = msg.shape.map(Number);
  const count = shape.reduce((a, b) => a * b, 1); // 1 for a 0-d tensor, 0 for an empty one
  if (msg.data.length !== count * spec.size) {
    throw new RangeError(`${msg.data.length} bytes for shape [${shape}] of ${msg.dtype}`);
  }
  // Read element by element: the Buffer may sit at an offset a typed array cannot start at.
  const values = new spec.array(count);
  for (let i = 0; i < count; i++) values[i] = msg.data[spec.read](i * spec.size);
  return { dtype: msg.dtype, shape, values, data: msg.data.toString("base64") };
}

/** Decoded tensor -> JSON-friendly form. float32 -> double is exact, so values compare as is. */
function tensorJson(t) {
  return { dtype: t.dtype, shape: t.shape, data: t.data, values: Array.from(t.values, Number) };
}

function namedJson(map) {
  return Object.fromEntries(Object.entries(map).map(([k, v]) => [k, tensorJson(decodeTensor(v))]));
}

// ------------------------------------------------------------------------------ google.protobuf.Struct

// proto-loader leaves Struct in its message form; JSON values are wrapped by hand.
function toValue(v) {
  if (v === null) return { nullValue: "NULL_VALUE" };
  if (typeof v === "number") return { numberValue: v };
  if (typeof v === "string") return { stringValue: v };
  if (typeof v === "boolean") return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}

function toStruct(obj) {
  return { fields: Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, toValue(v)])) };
}

// ------------------------------------------------------------------------------ calls

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(CALL_SECONDS) }, (err, reply) => {
      if (err) reject(new Error(`${method}: ${grpc.status[err.code]}: ${err.details}`));
      else resolve(reply);
    });
  });
}

function serverStream(client, method, request) {
  return new Promise((resolve, reject) => {
    const replies = [];
    const call = client[method](request, { deadline: deadline(TRAIN_SECONDS) });
    call.on("data", (reply) => replies.push(reply));
    call.on("error", (err) => reject(new Error(`${method}: ${grpc.status[err.code]}: ${err.details}`)));
    call.on("end", () => resolve(replies));
  });
}

// ------------------------------------------------------------------------------ the scenario

// Inputs are multiples of 1/8 so that they are exact in float32 and in JSON.
function data(n) {
  const x = new Float32Array(n * 3);
  const y = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < 3; j++) x[i * 3 + j] = (((i * 3 + j) * 5) % 11 - 5) / 8;
    y[i] = ((i * 7) % 9 - 4) / 8;
  }
  return { x, y };
}

function rows(values, width) {
  return Array.from({ length: values.length / width },
    (_, i) => Array.from(values.subarray(i * width, (i + 1) * width)));
}

async function main() {
  const port = process.argv[2];
  const host = process.argv[3] ?? "127.0.0.1";
  if (!port) throw new Error("usage: node interop.mjs <port> [host]");
  const client = new GradientService(`${host}:${port}`, grpc.credentials.createInsecure());
  const n = 10;
  const { x, y } = data(n);
  const inputs = [encodeTensor(x, [n, 3])];
  const target = encodeTensor(y, [n, 1]);
  const modelId = "node-twin";

  const info = await unary(client, "CreateModel", {
    model_id: modelId,
    spec: {
      layers: {
        layers: [
          { type: "Linear", kwargs: toStruct({ in_features: 3, out_features: 4 }) },
          { type: "Tanh", kwargs: toStruct({}) },
          { type: "Linear", kwargs: toStruct({ in_features: 4, out_features: 1 }) },
        ],
      },
      loss: { type: "mse" },
      optimizer: { type: "adam", params: toStruct({ lr: 0.01 }) },
      seed: 0,
    },
  });

  const backward = await unary(client, "Backward", {
    model_id: modelId, inputs, target, return_grads: true, return_output: true,
    request_id: "node-backward-1",
  });
  const step = await unary(client, "Step", { model_id: modelId, request_id: "node-step-1" });
  // The same request id again: answered with the first result, not applied a second time.
  const stepAgain = await unary(client, "Step", { model_id: modelId, request_id: "node-step-1" });

  const events = await serverStream(client, "Train", {
    model_id: modelId,
    data: { inline: { inputs, target } },
    options: { epochs: 3, batch_size: 4, shuffle: true, seed: 0, log_every_steps: 1 },
  });

  const params = await unary(client, "GetParameters", { model_id: modelId });
  const forward = await unary(client, "Forward", { model_id: modelId, inputs });
  client.close();

  const out = {
    inputs: { x: rows(x, 3), y: rows(y, 1) },
    model: {
      model_id: info.model_id,
      num_parameters: Number(info.num_parameters),
      parameters: info.parameters.map((p) => ({ name: p.name, shape: p.shape.map(Number), dtype: p.dtype })),
    },
    backward: {
      loss: backward._loss === "loss" ? backward.loss : null,
      step: Number(backward.step),
      grads: namedJson(backward.grads),
      output: tensorJson(decodeTensor(backward.output)),
    },
    step: Number(step.step),
    step_again: Number(stepAgain.step),
    train: events.map((e) => ({
      kind: e.kind,
      step: Number(e.step),
      run_step: Number(e.run_step),
      epoch: e.epoch,
      batch_loss: e.batch_loss,
      epoch_loss: e.epoch_loss,
      learning_rate: e.learning_rate,
      grad_norm: e.grad_norm,
      summary: e.summary === null ? null : {
        steps: Number(e.summary.steps),
        epochs: e.summary.epochs,
        final_loss: e.summary.final_loss,
        stop_reason: e.summary.stop_reason,
        model_step: Number(e.summary.model_step),
      },
    })),
    parameters: namedJson(params.parameters),
    forward: tensorJson(decodeTensor(forward.output)),
  };
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((err) => {
  process.stderr.write(`interop.mjs: ${err.message}\n`);
  process.exit(1);
});
