// A Node.js client built from proto/ alone, with @grpc/grpc-js's default channel settings: the
// proof that another language can use the server with nothing but the contract.
//
//   npm ci --prefix tests/node && node tests/node/client.mjs localhost:50051
//
// Calls Inspect, then Generate for text-to-image, image-to-image and inpainting; reassembles
// chunked images by (index, chunk_index) and checks each is a complete, valid PNG of the size its
// events announce. Prints one line per step and, last, `SUMMARY {json}`. Exits 1 on any failure.
import path from "node:path";
import { fileURLToPath } from "node:url";
import zlib from "node:zlib";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const PROTO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "proto");
const DEADLINE_MS = 120_000;
const SIZE = 64;
const STEPS = 4;
const STRENGTH = 0.75; // exact in float and double alike

// Only proto/: the google.protobuf well-known types (Struct, Duration) ship with proto-loader's protobufjs.
const definition = protoLoader.loadSync("autopipeline/v1/autopipeline.proto", {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as written in the .proto (snake_case)
  longs: String, // uint64 seeds and byte counts without losing precision
  enums: String,
  defaults: true, // proto3 zeros (index 0, chunk_index 0) as 0, not absent
  oneofs: true, // GenerateResponse.event names the event that arrived
});
const { AutoPipelineService } = grpc.loadPackageDefinition(definition).autopipeline.v1;

function fail(message) {
  throw new Error(message);
}

// PNG, as far as a client needs it: CRC-32, chunk walking, and a tiny encoder for the inputs.
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (const byte of bytes) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
const CHANNELS = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 }; // by PNG colour type

function pngChunk(type, data) {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(data.length, 0);
  head.write(type, 4, "latin1");
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])), 0);
  return Buffer.concat([head, data, crc]);
}

// An 8-bit PNG (colour type 2 = RGB, 0 = grey) whose pixels come from pixel(x, y) -> [channel values].
function encodePng(width, height, colourType, pixel) {
  const channels = CHANNELS[colourType];
  const raw = Buffer.alloc(height * (1 + width * channels));
  for (let y = 0; y < height; y++) {
    const row = y * (1 + width * channels); // filter byte 0 (none), then the pixels
    for (let x = 0; x < width; x++) raw.set(pixel(x, y), row + 1 + x * channels);
  }
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, colourType, 0, 0, 0], 8);
  return Buffer.concat([
    PNG_SIGNATURE,
    pngChunk("IHDR", header),
    pngChunk("IDAT", zlib.deflateSync(raw)),
    pngChunk("IEND", Buffer.alloc(0)),
  ]);
}

// Checks signature, every chunk's CRC, IHDR, and that IDAT inflates to exactly the pixel rows; returns the size.
function parsePng(bytes) {
  if (!bytes.subarray(0, 8).equals(PNG_SIGNATURE)) fail("not a PNG: bad signature");
  let offset = 8;
  let header = null;
  let ended = false;
  const idat = [];
  while (offset < bytes.length) {
    if (offset + 12 > bytes.length) fail("truncated PNG chunk");
    const length = bytes.readUInt32BE(offset);
    const type = bytes.toString("latin1", offset + 4, offset + 8);
    const end = offset + 8 + length;
    if (end + 4 > bytes.length) fail(`truncated PNG chunk ${type}`);
    if (crc32(bytes.subarray(offset + 4, end)) !== bytes.readUInt32BE(end)) fail(`bad CRC in ${type}`);
    const data = bytes.subarray(offset + 8, end);
    if (offset === 8 && type !== "IHDR") fail("PNG does not start with IHDR");
    if (type === "IHDR") {
      header = {
        width: data.readUInt32BE(0),
        height: data.readUInt32BE(4),
        bitDepth: data[8],
        colourType: data[9],
        interlace: data[12],
      };
    } else if (type === "IDAT") {
      idat.push(data);
    } else if (type === "IEND") {
      ended = true;
      offset = end + 4;
      break;
    }
    offset = end + 4;
  }
  if (!header || !ended || offset !== bytes.length) fail("PNG lacks IHDR or IEND, or has bytes after IEND");
  const channels = CHANNELS[header.colourType] ?? fail(`unknown PNG colour type ${header.colourType}`);
  if (header.interlace === 0) {
    const rowBytes = Math.ceil((header.width * channels * header.bitDepth) / 8);
    const pixels = zlib.inflateSync(Buffer.concat(idat));
    if (pixels.length !== header.height * (1 + rowBytes)) fail("PNG pixel data does not match IHDR");
  }
  return { width: header.width, height: header.height };
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

// Runs one Generate stream to its end; returns the events by kind (a failure status rejects).
function generate(client, request) {
  return new Promise((resolve, reject) => {
    const events = { started: [], images: [], completed: [] };
    const call = client.Generate(request, { deadline: Date.now() + DEADLINE_MS });
    call.on("data", (response) => {
      if (response.event === "started") events.started.push(response.started);
      else if (response.event === "image") events.images.push(response.image);
      else if (response.event === "completed") events.completed.push(response.completed);
    });
    call.on("error", reject);
    call.on("end", () => resolve(events));
  });
}

// Joins each image's chunks in chunk_index order and validates the PNG against the events.
function assemble(events, expected) {
  if (events.completed.length !== 1) fail(`expected one completed event, got ${events.completed.length}`);
  const byIndex = new Map();
  for (const part of events.images) {
    if (!byIndex.has(part.index)) byIndex.set(part.index, []);
    byIndex.get(part.index).push(part);
  }
  if (byIndex.size !== expected.count) fail(`expected ${expected.count} images, got ${byIndex.size}`);
  const images = [];
  for (const [index, parts] of [...byIndex].sort((a, b) => a[0] - b[0])) {
    parts.sort((a, b) => a.chunk_index - b.chunk_index);
    const count = parts[0].chunk_count;
    if (parts.length !== count || parts.some((part, i) => part.chunk_index !== i)) {
      fail(`image ${index}: chunks ${parts.map((p) => p.chunk_index)} of ${count}`);
    }
    const { width, height, seed } = parts[0];
    if (parts.some((p) => p.width !== width || p.height !== height)) fail(`image ${index}: sizes disagree`);
    const data = Buffer.concat(parts.map((part) => part.image.data));
    const png = parsePng(data);
    if (png.width !== width || png.height !== height) {
      fail(`image ${index}: PNG is ${png.width}x${png.height}, events say ${width}x${height}`);
    }
    if (width !== expected.width || height !== expected.height) {
      fail(`image ${index}: ${width}x${height}, asked for ${expected.width}x${expected.height}`);
    }
    if (BigInt(seed) !== expected.seed + BigInt(index)) fail(`image ${index}: seed ${seed}`);
    images.push({ index, width, height, chunks: parts.length, bytes: data.length });
  }
  return images;
}

function modelFor(inspect, task) {
  const ready = inspect.models.filter((m) => m.state === "MODEL_STATE_READY");
  const able = ready.filter((m) => (m.tasks ?? []).some((t) => t.task === task));
  const preferred = able.find((m) => m.name === inspect.server?.default_model) ?? able[0];
  return preferred?.name ?? fail(`no ready model offers ${task}`);
}

async function main(target) {
  // Default channel settings: no options, so a 4 MiB receive limit like every language's default.
  const client = new AutoPipelineService(target, grpc.credentials.createInsecure());
  try {
    const inspect = await unary(client, "Inspect", {});
    const names = inspect.models.map((m) => m.name);
    console.log(`inspect: server ${inspect.server?.version} models ${names.join(",")}`);

    const input = encodePng(SIZE, SIZE, 2, (x, y) => [(x * 4) & 0xff, (y * 4) & 0xff, 128]);
    const inside = (v) => v >= SIZE / 4 && v < (SIZE * 3) / 4;
    const mask = encodePng(SIZE, SIZE, 0, (x, y) => [inside(x) && inside(y) ? 255 : 0]);
    const image = { data: input, mime_type: "image/png" };
    const common = { prompt: "a lighthouse at dusk", width: SIZE, height: SIZE, num_inference_steps: STEPS };
    const calls = [
      { name: "text-to-image", task: "TASK_TEXT_TO_IMAGE", count: 2, fields: { num_images: 2 } },
      { name: "image-to-image", task: "TASK_IMAGE_TO_IMAGE", count: 1, fields: { image, strength: STRENGTH } },
      {
        name: "inpainting",
        task: "TASK_INPAINTING",
        count: 1,
        fields: { image, mask_image: { data: mask, mime_type: "image/png" }, strength: STRENGTH },
      },
    ];
    const summary = { models: names, tasks: {} };
    for (const [i, call] of calls.entries()) {
      const seed = 1000n + BigInt(i);
      const model = modelFor(inspect, call.task);
      const request = { ...common, ...call.fields, model, task: call.task, seed: seed.toString() };
      const images = assemble(await generate(client, request), {
        count: call.count,
        width: SIZE,
        height: SIZE,
        seed,
      });
      const chunks = images.reduce((total, item) => total + item.chunks, 0);
      console.log(`${call.name}: model ${model}, ${images.length} PNG(s) ${SIZE}x${SIZE}, ${chunks} chunk(s)`);
      summary.tasks[call.name] = { model, images };
    }
    console.log(`SUMMARY ${JSON.stringify(summary)}`);
  } finally {
    client.close();
  }
}

const target = process.argv[2] ?? fail("usage: node client.mjs HOST:PORT");
try {
  await main(target);
} catch (error) {
  const status = error.code !== undefined ? ` (gRPC status ${grpc.status[error.code]}: ${error.details})` : "";
  console.error(`error: ${error.message}${status}`);
  process.exit(1);
}
