// Rendezvous routing over several gradserve servers, in Node.js, from docs/interop.md
// ("Several servers") alone: the same choices as the Python SDK's gradserve.routing.
//
//   node tests/node/routing.mjs owners < cases.json    # {"servers": [...], "keys": [...]}[]
//   node tests/node/routing.mjs create HOST:PORT ...    # create models through the routing
//
// `owners` prints, for each case, the normalized servers and the owner of every key (or the
// error a malformed address gives); `create` makes a few models on the servers given (in that
// order), each sent to its owner, and prints {model id: server}. tests/test_routing.py compares
// both with the Python SDK. Exit status 1 (message on stderr) on error.

import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const DNS_NAME = /^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$/;
const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

/** A server address -> its identity: host:port, lower-case, IPv6 compressed in brackets. */
export function normalize(address) {
  if (!/^[\x00-\x7f]*$/.test(address)) throw new Error(`server ${address}: not ASCII`);
  const text = address.trim(); // ASCII: space, \t \n \v \f \r, as the docs say
  let host;
  let port;
  if (text.startsWith("[")) {
    const end = text.indexOf("]:");
    if (end < 0) throw new Error(`server ${address}: expected [IPv6]:port`);
    host = text.slice(1, end);
    port = text.slice(end + 2);
  } else {
    const colon = text.lastIndexOf(":");
    if (colon <= 0) throw new Error(`server ${address}: expected host:port`);
    host = text.slice(0, colon);
    port = text.slice(colon + 1);
    if (host.includes(":")) throw new Error(`server ${address}: IPv6 goes in brackets`);
  }
  if (!/^\d+$/.test(port) || Number(port) < 1 || Number(port) > 65535) {
    throw new Error(`server ${address}: the port must be a number from 1 to 65535`);
  }
  host = host.toLowerCase();
  if (text.startsWith("[")) {
    // The WHATWG URL parser validates an IPv6 address and writes it in RFC 5952 form.
    if (!host.includes(":") || host.includes("%")) throw new Error(`server ${address}: not IPv6`);
    let compressed;
    try {
      compressed = new URL(`http://[${host}]/`).hostname;
    } catch {
      throw new Error(`server ${address}: not IPv6`);
    }
    return `${compressed}:${Number(port)}`;
  }
  if (!IPV4.test(host)) {
    if (host.endsWith(".")) host = host.slice(0, -1);
    if (!DNS_NAME.test(host)) throw new Error(`server ${address}: not a host name or IP address`);
  }
  return `${host}:${Number(port)}`;
}

/** First 8 bytes, big-endian, of SHA-256(server UTF-8 || 0x00 || key UTF-8). */
export function weight(server, key) {
  const digest = createHash("sha256")
    .update(Buffer.concat([Buffer.from(server, "utf8"), Buffer.from([0]), Buffer.from(key, "utf8")]))
    .digest();
  return digest.readBigUInt64BE(0);
}

/** The identity of the server that owns key: highest weight, ties to the first in order. */
export function owner(key, servers) {
  const identities = [...new Set(servers.map(normalize))].sort(); // ASCII: code-unit order
  if (identities.length === 0) throw new Error("no servers");
  let best = identities[0];
  let bestWeight = -1n;
  for (const server of identities) {
    const w = weight(server, key);
    if (w > bestWeight) {
      best = server;
      bestWeight = w;
    }
  }
  return best;
}

// ------------------------------------------------------------------------------ commands

function owners(cases) {
  return cases.map(({ servers, keys }) => {
    try {
      return {
        servers: [...new Set(servers.map(normalize))].sort(),
        owners: keys.map((k) => owner(k, servers)),
        weights: keys.map((k) => servers.map((s) => weight(normalize(s), k).toString(16).padStart(16, "0"))),
      };
    } catch (err) {
      return { error: err.message };
    }
  });
}

async function create(addresses) {
  const grpc = await import("@grpc/grpc-js");
  const protoLoader = await import("@grpc/proto-loader");
  const protos = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");
  const definition = protoLoader.loadSync("gradserve/v1/gradserve.proto", {
    includeDirs: [protos], keepCase: true, longs: String, enums: String, defaults: true,
  });
  const { GradientService } = grpc.loadPackageDefinition(definition).gradserve.v1;
  const clients = new Map(addresses.map((a) => [normalize(a), new GradientService(a, grpc.credentials.createInsecure())]));
  const w = { dtype: "DTYPE_FLOAT32", shape: [], data: Buffer.from(new Float32Array([2]).buffer) };
  const placed = {};
  for (let i = 0; i < 12; i++) {
    const modelId = `node-${i}`;
    const server = owner(modelId, addresses);
    await new Promise((resolve, reject) => {
      clients.get(server).CreateModel(
        { model_id: modelId, spec: { expression: { expression: "w * x", inputs: ["x"], parameters: { w } } } },
        { deadline: new Date(Date.now() + 30_000) },
        (err) => (err ? reject(new Error(`CreateModel ${modelId} on ${server}: ${err.details}`)) : resolve()),
      );
    });
    placed[modelId] = server;
  }
  for (const c of clients.values()) c.close();
  return placed;
}

const [command, ...rest] = process.argv.slice(2);
try {
  if (command === "owners") {
    console.log(JSON.stringify(owners(JSON.parse(readFileSync(0, "utf8")))));
  } else if (command === "create") {
    console.log(JSON.stringify(await create(rest)));
  } else {
    throw new Error("usage: routing.mjs owners < cases.json | routing.mjs create HOST:PORT ...");
  }
} catch (err) {
  console.error(err.message);
  process.exit(1);
}
