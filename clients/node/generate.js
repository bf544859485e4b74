#!/usr/bin/env node
// Switchyard from Node.js: streams a completion from the front door (switchyard.api.v1.Generation),
// printing text as it arrives and the usage at the end; --list-services asks the server's reflection
// instead. The API's .proto files are loaded from the repository's protos/ at run time (--protos to
// point elsewhere); reflection needs no local copy of them.
//
//   npm ci                                    # in clients/node, once (or: make client-node)
//   node generate.js --prompt "The capital of France is" --max-tokens 16
//   node generate.js --chat --prompt "Name three primary colors."
//   node generate.js --list-services
//
// Flags: --address host:port (127.0.0.1:50051), --prompt TEXT, --chat (send the prompt as a user
// turn), --max-tokens N (64), --temperature T (0), --timeout-s S (120), --api-key KEY (or
// SWITCHYARD_API_KEY), --ca FILE [--cert FILE --key FILE] (TLS, mutual with cert and key),
// --insecure (plaintext to a non-loopback address), --protos DIR.
'use strict';

const fs = require('fs');
const net = require('net');
const path = require('path');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const SERVICE = 'switchyard.api.v1.Generation';
// The same retry policy as the Python client: gRPC retries UNAVAILABLE and RESOURCE_EXHAUSTED itself,
// but only before the server sent anything (for Generate: before the first token).
const SERVICE_CONFIG = {
  methodConfig: [{
    name: [{ service: SERVICE }],
    retryPolicy: {
      maxAttempts: 4, initialBackoff: '0.2s', maxBackoff: '2s', backoffMultiplier: 2,
      retryableStatusCodes: ['UNAVAILABLE', 'RESOURCE_EXHAUSTED'],
    },
  }],
  retryThrottling: { maxTokens: 10, tokenRatio: 0.1 },
};

function parse() {
  const { values } = parseArgs({
    options: {
      address: { type: 'string', default: '127.0.0.1:50051' },
      prompt: { type: 'string', default: 'The capital of France is' },
      chat: { type: 'boolean', default: false },
      'max-tokens': { type: 'string', default: '64' },
      temperature: { type: 'string', default: '0' },
      'timeout-s': { type: 'string', default: '120' },
      'api-key': { type: 'string', default: process.env.SWITCHYARD_API_KEY || '' },
      ca: { type: 'string' },
      cert: { type: 'string' },
      key: { type: 'string' },
      insecure: { type: 'boolean', default: false },
      protos: { type: 'string', default: path.resolve(__dirname, '..', '..', 'protos') },
      'list-services': { type: 'boolean', default: false },
    },
  });
  return values;
}

function isLoopback(address) {
  const host = address.startsWith('[') ? address.slice(1, address.indexOf(']')) : address.replace(/:\d+$/, '');
  if (host === 'localhost') return true;
  if (net.isIPv4(host)) return host.startsWith('127.');
  return net.isIPv6(host) && (host === '::1' || host === '0:0:0:0:0:0:0:1');
}

// Channel credentials and per-call metadata. TLS when --ca is given or the address is not loopback;
// there the API key goes as call credentials. Plaintext only to loopback (or with --insecure), where
// grpc-js cannot attach call credentials, so the key goes as plain metadata.
function credentials(args) {
  const metadata = new grpc.Metadata();
  const useTls = Boolean(args.ca) || (!isLoopback(args.address) && !args.insecure);
  if (!useTls) {
    if (args['api-key']) metadata.set('authorization', `Bearer ${args['api-key']}`);
    return { channel: grpc.credentials.createInsecure(), metadata };
  }
  const read = (file) => (file ? fs.readFileSync(file) : null);
  let channel = grpc.credentials.createSsl(read(args.ca), read(args.key), read(args.cert));
  if (args['api-key']) {
    const key = args['api-key'];
    channel = grpc.credentials.combineChannelCredentials(channel, grpc.credentials.createFromMetadataGenerator(
      (_params, callback) => {
        const m = new grpc.Metadata();
        m.set('authorization', `Bearer ${key}`);
        callback(null, m);
      }));
  }
  return { channel, metadata };
}

function channelOptions() {
  return {
    'grpc.service_config': JSON.stringify(SERVICE_CONFIG),
    'grpc.max_receive_message_length': 64 * 1024 * 1024,
    'grpc.primary_user_agent': 'switchyard-node-example/0.1.0',
  };
}

function describeError(err) {
  const field = err.metadata && err.metadata.get('switchyard-field')[0];
  const retry = err.metadata && err.metadata.get('retry-after-ms')[0];
  const code = Object.keys(grpc.status).find((name) => grpc.status[name] === err.code) || err.code;
  return `error: ${code}: ${err.details}` + (field ? ` (field ${field})` : '') + (retry ? ` (retry after ${retry} ms)` : '');
}

function generate(args) {
  const definition = protoLoader.loadSync('switchyard/api/v1/generation.proto', { ...LOADER_OPTIONS, includeDirs: [args.protos] });
  const { Generation } = grpc.loadPackageDefinition(definition).switchyard.api.v1;
  const { channel, metadata } = credentials(args);
  const client = new Generation(args.address, channel, channelOptions());
  const request = {
    sampling: { max_tokens: Number(args['max-tokens']), temperature: Number(args.temperature) },
  };
  if (args.chat) request.messages = { messages: [{ role: 'user', content: args.prompt }] };
  else request.prompt = args.prompt;
  const deadline = new Date(Date.now() + Number(args['timeout-s']) * 1000);
  const call = client.Generate(request, metadata, { deadline });
  call.on('data', (response) => {
    process.stdout.write(response.text);
    if (response.usage) {
      const u = response.usage;
      const reason = String(response.finish_reason).replace('FINISH_REASON_', '').toLowerCase();
      process.stdout.write(`\n[finish_reason=${reason} prompt_tokens=${u.prompt_tokens} `
        + `completion_tokens=${u.completion_tokens} cached_tokens=${u.cached_tokens}]\n`);
    }
  });
  call.on('error', (err) => {
    process.stderr.write(`\n${describeError(err)}\n`);
    process.exitCode = 1;
    client.close();
  });
  call.on('end', () => client.close());
}

// A FileDescriptorSet is `repeated FileDescriptorProto file = 1`: each file is field 1, length-delimited.
function fileDescriptorSet(files) {
  const parts = [];
  for (const file of files) {
    const header = [0x0a];
    let n = file.length;
    while (n > 0x7f) { header.push((n & 0x7f) | 0x80); n >>>= 7; }
    header.push(n);
    parts.push(Buffer.from(header), file);
  }
  return Buffer.concat(parts);
}

// Asks the server's reflection (grpc.reflection.v1alpha, open without an API key) for its services,
// then for the files that define them, and prints each service with its methods.
function listServices(args) {
  const definition = protoLoader.loadSync('grpc/reflection/v1alpha/reflection.proto',
    { ...LOADER_OPTIONS, includeDirs: [path.join(__dirname, 'proto')] });
  const { ServerReflection } = grpc.loadPackageDefinition(definition).grpc.reflection.v1alpha;
  const { channel, metadata } = credentials(args);
  const client = new ServerReflection(args.address, channel, channelOptions());
  const call = client.ServerReflectionInfo(metadata, { deadline: new Date(Date.now() + Number(args['timeout-s']) * 1000) });
  const files = new Map();
  let services = null;
  let pending = 0;
  call.on('data', (response) => {
    if (response.error_response) {
      process.stderr.write(`reflection error ${response.error_response.error_code}: ${response.error_response.error_message}\n`);
      process.exitCode = 1;
    } else if (response.list_services_response) {
      services = response.list_services_response.service.map((s) => s.name).sort();
      pending = services.length;
      for (const name of services) call.write({ file_containing_symbol: name });
      if (pending === 0) call.end();
      return;
    } else if (response.file_descriptor_response) {
      for (const file of response.file_descriptor_response.file_descriptor_proto) files.set(file.toString('base64'), file);
    }
    pending -= 1;
    if (pending === 0) call.end();
  });
  call.on('error', (err) => {
    process.stderr.write(`${describeError(err)}\n`);
    process.exitCode = 1;
    client.close();
  });
  call.on('end', () => {
    const described = protoLoader.loadFileDescriptorSetFromBuffer(fileDescriptorSet([...files.values()]), LOADER_OPTIONS);
    for (const name of services || []) {
      const methods = described[name] ? Object.entries(described[name]).map(([method, d]) =>
        method + ({ 'true,true': ' (bidi streaming)', 'true,false': ' (client streaming)', 'false,true': ' (server streaming)' }[
          [d.requestStream, d.responseStream].join()] || '')) : [];
      process.stdout.write(`${name}${methods.length ? ': ' + methods.join(', ') : ''}\n`);
    }
    client.close();
  });
  call.write({ list_services: '' });
}

const args = parse();
if (args['list-services']) listServices(args);
else generate(args);
