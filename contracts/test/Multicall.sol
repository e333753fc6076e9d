// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title Multicall
/// @notice Test helper: several calls to one target in ONE transaction, made by this contract, in order. The tests
/// use it to put two events of one channel into one transaction (as a payer that is a contract, or as anyone).
contract Multicall {
    /// @param target The contract to call.
    /// @param calls The calldata of each call, in order.
    /// @param values The ETH to send with each call; their sum must be `msg.value`.
    function run(address target, bytes[] calldata calls, uint256[] calldata values) external payable {
        for (uint256 i = 0; i < calls.length; i++) {
            (bool ok, bytes memory ret) = target.call{value: values[i]}(calls[i]);
            if (!ok) {
                assembly ("memory-safe") {
                    revert(add(ret, 0x20), mload(ret))
                }
            }
        }
    }

    receive() external payable {}
}
