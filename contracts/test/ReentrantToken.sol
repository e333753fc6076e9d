// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title ReentrantToken
/// @notice Test token that, on each transfer, calls back into `target` with `payload` once, recording the outcome.
contract ReentrantToken is ERC20 {
    address public target;
    bytes public payload;
    bool public attempted;
    bool public reentered;
    bytes public revertData;

    constructor() ERC20("Reentrant Token", "REENTER") {}

    /// @notice Mints `amount` to `to` (tests only).
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @notice Arms the callback: the next transfer calls `target_` with `payload_`.
    function arm(address target_, bytes calldata payload_) external {
        target = target_;
        payload = payload_;
        attempted = false;
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        if (target != address(0) && !attempted) {
            attempted = true;
            (bool ok, bytes memory data) = target.call(payload);
            reentered = ok;
            revertData = data;
        }
    }
}
