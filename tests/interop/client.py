"""A sagamesh client in Python, generated from proto/ with grpcio-tools.

Usage: python3 tests/interop/client.py HOST:PORT

Generates the stubs into a temporary directory, buys the demo item for the
demo user, follows StreamTransaction to the end and prints the statuses it
saw. Exits non-zero unless the purchase ends COMPLETED.
"""

import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = [
    "sagamesh/v1/events.proto",
    "sagamesh/v1/router.proto",
    "sagamesh/v1/coordinator.proto",
    "sagamesh/v1/wallets.proto",
    "sagamesh/v1/inventory.proto",
]


def generate(out: pathlib.Path) -> None:
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *PROTOS,
        ],
        check=True,
    )


def main() -> int:
    address = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        generate(out)
        sys.path.insert(0, str(out))
        import grpc
        from sagamesh.v1 import coordinator_pb2, coordinator_pb2_grpc, wallets_pb2, wallets_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            wallets = wallets_pb2_grpc.WalletsStub(channel)
            before = wallets.GetUser(wallets_pb2.GetUserRequest(user_id="user-123")).balance
            coordinator = coordinator_pb2_grpc.PurchaseCoordinatorStub(channel)
            response = coordinator.Purchase(
                coordinator_pb2.PurchaseRequest(user_id="user-123", item_id="item-sword", quantity=1),
                timeout=10,
            )
            assert response.status == coordinator_pb2.INITIATED, response
            seen = []
            request = coordinator_pb2.StreamTransactionRequest(transaction_id=response.transaction_id)
            for update in coordinator.StreamTransaction(request, timeout=30):
                seen.append(coordinator_pb2.TransactionStatus.Name(update.transaction.status))
            after = wallets.GetUser(wallets_pb2.GetUserRequest(user_id="user-123")).balance
        print(" ".join(seen))
        if seen[-1:] != ["COMPLETED"]:
            print(f"expected the stream to end with COMPLETED, saw {seen}", file=sys.stderr)
            return 1
        if before - after != 100:
            print(f"expected the balance to drop by 100, it went {before} -> {after}", file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
