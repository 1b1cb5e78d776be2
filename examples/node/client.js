#!/usr/bin/env node
// A pdp client for Node meeting nodes (mediasoup services and the like).
//
// It loads proto/pdp/v1/admission.proto itself with @grpc/proto-loader (no generated
// code) and calls the sidecar with @grpc/grpc-js, one channel for every call and a
// deadline on each. Decisions print as `pdp check` prints them. `node client.js --help`.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { service: healthService } = require('grpc-health-check');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const EXIT = { ok: 0, deny: 3, usage: 2, notServing: 1 };

const USAGE = `usage: node client.js COMMAND [options]

Ask a pdp sidecar. Exit 0 on ALLOW (or SERVING), 3 on DENY, 1 on NOT_SERVING,
2 on usage or transport errors (the gRPC status is printed).

commands:
  check   --ip IP --meeting ID [--tag TAG]... [--host-account ID] [--action join|host]
          one participant (Check)
  batch   --meeting ID --ip IP [--ip IP]... [--tag TAG]... [--host-account ID] [--action join|host]
          many participants of one meeting, one policy version (CheckBatch); exit 3 if any DENY
  watch   [--events N]
          print the active policy, then every activation (WatchPolicy); stop after N events
  health  [--service NAME]
          grpc.health.v1 status of the sidecar ("" = the whole server)

options:
  --target ADDR       127.0.0.1:50051 (default) or unix:/path/to.sock
  --deadline-ms MS    deadline of each unary call (default 1000)
  --watch-seconds S   deadline of the WatchPolicy stream (default 3600; a node resubscribes)
  --json              check and batch print CheckResponse as JSON, like \`pdp check --json\``;

const OPTIONS = {
  target: { type: 'string', default: '127.0.0.1:50051' },
  'deadline-ms': { type: 'string', default: '1000' },
  'watch-seconds': { type: 'string', default: '3600' },
  ip: { type: 'string', multiple: true, default: [] },
  meeting: { type: 'string' },
  tag: { type: 'string', multiple: true, default: [] },
  'host-account': { type: 'string', default: '' },
  action: { type: 'string', default: 'join' },
  events: { type: 'string', default: '0' },
  service: { type: 'string', default: '' },
  json: { type: 'boolean', default: false },
  help: { type: 'boolean', short: 'h', default: false },
};

class UsageError extends Error {}

function loadPdpV1() {
  const definition = protoLoader.loadSync('pdp/v1/admission.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the proto: policy_version, legal_basis
    longs: String, // int64 as decimal strings: no precision lost
    enums: String, // VERDICT_DENY, not 2
    defaults: true, // absent fields read as their proto3 defaults
  });
  return grpc.loadPackageDefinition(definition).pdp.v1;
}

function deadline(ms) {
  return new Date(Date.now() + ms);
}

// One unary call as a promise; rejects with the grpc-js error (code, details).
function unary(client, method, request, ms) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(ms) }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

function formatBuild(seconds) {
  return new Date(Number(seconds) * 1000).toISOString().slice(0, 10);
}

function locationText(location) {
  if (!location.found) return 'unknown (no country for this address)';
  const subdivisions = location.subdivisions.length ? ` (${location.subdivisions.join(', ')})` : '';
  return location.country + subdivisions;
}

// The lines `pdp check` prints for one CheckResponse.
function decisionLines(result) {
  const lines = [`${result.verdict.replace('VERDICT_', '')}  ${result.rule_id || '(no rule)'}`];
  lines.push(`  reason       ${result.reason}`);
  if (result.legal_basis) lines.push(`  legal basis  ${result.legal_basis}`);
  lines.push(`  location     ${locationText(result.location)}`);
  lines.push(`  policy       version ${result.policy_version}, GeoIP build ${formatBuild(result.geoip_build)}`);
  if (result.shadow_rule_ids.length) {
    lines.push(`  shadow       ${result.shadow_rule_ids.join(', ')} (matched, not enforced)`);
  }
  return lines;
}

// RFC 3339 in UTC to the second, as `pdp check --json` gives the build next to its epoch.
function buildTime(epoch) {
  return new Date(Number(epoch) * 1000).toISOString().replace(/\.\d{3}Z$/, 'Z');
}

// The document `pdp check --json` prints.
function decisionJson(result) {
  return {
    verdict: result.verdict.replace('VERDICT_', ''),
    rule_id: result.rule_id,
    reason: result.reason,
    legal_basis: result.legal_basis,
    location: {
      found: result.location.found,
      country: result.location.country,
      subdivisions: result.location.subdivisions,
    },
    policy_version: Number(result.policy_version),
    geoip_build: Number(result.geoip_build),
    geoip_build_time: buildTime(result.geoip_build),
    shadow_rule_ids: result.shadow_rule_ids,
  };
}

function meetingOf(values) {
  if (!values.meeting) throw new UsageError('--meeting is required');
  return { meeting_id: values.meeting, host_account_id: values['host-account'], tags: values.tag };
}

function actionOf(values) {
  const action = { join: 'ACTION_JOIN', host: 'ACTION_HOST' }[values.action];
  if (!action) throw new UsageError(`--action: ${JSON.stringify(values.action)} is not join or host`);
  return action;
}

function positiveNumber(values, name) {
  const number = Number(values[name]);
  if (!Number.isFinite(number) || number < 0) throw new UsageError(`--${name}: ${values[name]} is not a number >= 0`);
  return number;
}

async function check(clients, values, ms) {
  if (values.ip.length !== 1) throw new UsageError('check takes exactly one --ip');
  const request = { participant: { ip: values.ip[0] }, meeting: meetingOf(values), action: actionOf(values) };
  const result = await unary(clients.admission, 'Check', request, ms);
  console.log(values.json ? JSON.stringify(decisionJson(result), null, 2) : decisionLines(result).join('\n'));
  return result.verdict === 'VERDICT_DENY' ? EXIT.deny : EXIT.ok;
}

async function batch(clients, values, ms) {
  if (!values.ip.length) throw new UsageError('batch needs at least one --ip');
  const request = {
    meeting: meetingOf(values),
    participants: values.ip.map((ip) => ({ ip })),
    action: actionOf(values),
  };
  const response = await unary(clients.admission, 'CheckBatch', request, ms);
  if (values.json) {
    console.log(JSON.stringify(response.results.map(decisionJson), null, 2));
  } else {
    console.log(`policy version ${response.policy_version}, GeoIP build ${formatBuild(response.geoip_build)}`);
    response.results.forEach((result, index) => {
      console.log(`[${index}] ${values.ip[index]}`);
      console.log(decisionLines(result).join('\n'));
    });
  }
  return response.results.some((result) => result.verdict === 'VERDICT_DENY') ? EXIT.deny : EXIT.ok;
}

// Resolves after `events` events (0: when the stream ends, at the latest its deadline).
function watch(clients, values) {
  const wanted = positiveNumber(values, 'events');
  const seconds = positiveNumber(values, 'watch-seconds');
  return new Promise((resolve, reject) => {
    const stream = clients.admission.WatchPolicy({}, { deadline: deadline(seconds * 1000) });
    let seen = 0;
    stream.on('data', (event) => {
      const at = new Date(Number(event.activated_at.seconds) * 1000).toISOString();
      console.log(
        `policy version ${event.policy_version} active since ${at}, GeoIP build ${formatBuild(event.geoip_build)}`,
      );
      // A meeting node would re-check its live participants here, with one CheckBatch per meeting.
      seen += 1;
      if (wanted && seen >= wanted) stream.cancel();
    });
    stream.on('error', (error) => {
      const expected = error.code === grpc.status.CANCELLED || error.code === grpc.status.DEADLINE_EXCEEDED;
      if (expected && (!wanted || seen >= wanted)) resolve(EXIT.ok);
      else reject(error);
    });
    stream.on('end', () => resolve(wanted && seen < wanted ? EXIT.usage : EXIT.ok));
  });
}

async function health(clients, values, ms) {
  const response = await unary(clients.health, 'Check', { service: values.service }, ms);
  console.log(response.status);
  return response.status === 'SERVING' ? EXIT.ok : EXIT.notServing;
}

const COMMANDS = { check, batch, watch, health };

async function main(argv) {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  } catch (error) {
    console.error(`client.js: ${error.message}\n${USAGE}`);
    return EXIT.usage;
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(USAGE);
    return EXIT.ok;
  }
  const command = COMMANDS[positionals[0]];
  if (!command || positionals.length !== 1) {
    console.error(`client.js: give one command: ${Object.keys(COMMANDS).join(', ')}\n${USAGE}`);
    return EXIT.usage;
  }
  const credentials = grpc.credentials.createInsecure(); // loopback or a Unix socket, as pdp listens by default
  const { AdmissionService } = loadPdpV1();
  const Health = grpc.makeClientConstructor(healthService, 'grpc.health.v1.Health');
  // Both stubs share one connection: grpc-js pools subchannels by target and options.
  const clients = {
    admission: new AdmissionService(values.target, credentials),
    health: new Health(values.target, credentials),
  };
  try {
    return await command(clients, values, positiveNumber(values, 'deadline-ms'));
  } catch (error) {
    if (error instanceof UsageError) {
      console.error(`client.js: ${error.message}`);
    } else if (typeof error.code === 'number') {
      console.error(`client.js: ${values.target}: ${grpc.status[error.code]}: ${error.details}`);
    } else {
      throw error;
    }
    return EXIT.usage;
  } finally {
    clients.admission.close();
    clients.health.close();
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
