// A sagamesh client in Node.js: loads proto/ at run time with
// @grpc/proto-loader, as a Node service of a team using sagamesh would.
//
// Usage: node tests/interop/node/client.mjs HOST:PORT
//
// Buys the demo item for the demo user, follows StreamTransaction to the
// end and reads the transaction back; then a purchase by a user who cannot
// pay, which must end FAILED with its first step FAILED; then two refusals.
// Prints the statuses the stream showed, the steps' statuses, and the
// failed saga's; exits non-zero when anything is not as the public
// contract says.

import { fileURLToPath } from 'node:url';
import path from 'node:path';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

const definition = protoLoader.loadSync(
  ['sagamesh/v1/coordinator.proto', 'sagamesh/v1/wallets.proto'],
  {
    includeDirs: [path.join(ROOT, 'proto')],
    keepCase: true,
    enums: String,
    longs: String,
    defaults: true,
  },
);
const v1 = grpc.loadPackageDefinition(definition).sagamesh.v1;

const address = process.argv[2];
const credentials = grpc.credentials.createInsecure();
const coordinator = new v1.PurchaseCoordinator(address, credentials);
const wallets = new v1.Wallets(address, credentials);

/** A unary call as a promise, with a deadline. */
function call(client, method, request) {
  const deadline = new Date(Date.now() + 10_000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

/** Every update of a StreamTransaction until the server ends it. */
function follow(transactionId) {
  const deadline = new Date(Date.now() + 30_000);
  return new Promise((resolve, reject) => {
    const seen = [];
    const stream = coordinator.StreamTransaction({ transaction_id: transactionId }, { deadline });
    stream.on('data', (update) => seen.push(update.transaction));
    stream.on('error', reject);
    stream.on('end', () => resolve(seen));
  });
}

/** The gRPC status code a call fails with. */
async function refusal(client, method, request) {
  try {
    await call(client, method, request);
  } catch (error) {
    return error.code;
  }
  throw new Error(`${method} ${JSON.stringify(request)} was not refused`);
}

function expect(condition, message) {
  if (!condition) {
    console.error(message);
    process.exit(1);
  }
}

const before = BigInt((await call(wallets, 'GetUser', { user_id: 'user-123' })).balance);
const response = await call(coordinator, 'Purchase', {
  user_id: 'user-123',
  item_id: 'item-sword',
  quantity: 1,
});
expect(response.status === 'INITIATED', `Purchase answered ${JSON.stringify(response)}`);

const updates = await follow(response.transaction_id);
const statuses = updates.map((transaction) => transaction.status);
console.log(statuses.join(' '));
expect(statuses.at(-1) === 'COMPLETED', `expected the stream to end with COMPLETED, saw ${statuses}`);

const done = await call(coordinator, 'GetTransaction', { transaction_id: response.transaction_id });
const steps = done.steps.map((step) => `${step.step}=${step.status}`);
console.log(steps.join(' '));
expect(done.total_price === '100', `expected a total of 100, got ${done.total_price}`);
expect(
  done.steps.length === 4 && done.steps.every((step) => step.status === 'SUCCESS'),
  `expected four successful steps, got ${steps}`,
);

const after = BigInt((await call(wallets, 'GetUser', { user_id: 'user-123' })).balance);
expect(before - after === 100n, `expected the balance to drop by 100, it went ${before} -> ${after}`);

// A user who cannot pay: the saga fails at its first step, and the names
// of the statuses are the specification's.
const broke = `node-broke-${process.pid}-${Date.now()}`;
await call(wallets, 'CreateUser', { user_id: broke, balance: 0 });
const unpaid = await call(coordinator, 'Purchase', { user_id: broke, item_id: 'item-sword', quantity: 1 });
const failed = (await follow(unpaid.transaction_id)).at(-1);
console.log(`${failed.status} ${failed.steps.map((step) => `${step.step}=${step.status}`).join(' ')}`);
expect(failed.status === 'FAILED', `expected the unpaid purchase to end FAILED, got ${failed.status}`);
expect(
  failed.steps.length === 1 && failed.steps[0].status === 'FAILED',
  `expected the first step FAILED, got ${JSON.stringify(failed.steps)}`,
);

const zero = await refusal(coordinator, 'Purchase', { user_id: 'user-123', item_id: 'item-sword', quantity: 0 });
expect(zero === grpc.status.INVALID_ARGUMENT, `a purchase of 0 items answered code ${zero}`);
const unknown = await refusal(coordinator, 'GetTransaction', { transaction_id: 'no-such-transaction' });
expect(unknown === grpc.status.NOT_FOUND, `an unknown transaction answered code ${unknown}`);

coordinator.close();
wallets.close();
