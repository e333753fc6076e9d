// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title EthRejecter
/// @notice Test recipient whose receive function always reverts.
contract EthRejecter {
    receive() external payable {
        revert();
    }
}
